//! ApiVersions: the broker's answer is intersected with what keyward decodes and rewrites (see
//! [`crate::proxy::versions`]), so clients negotiate only versions keyward can handle.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

use super::{Pending, Step};
use crate::codec::errors::UNSUPPORTED_VERSION;
use crate::codec::frame::RequestHead;
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::wire::Reader;
use crate::proxy::rewrite::{RewriteError, recode_as};
use crate::proxy::versions::{self, Admission};

pub fn response(frame: &Bytes, version: i16) -> Result<Bytes, RewriteError> {
    let api = ApiKey::ApiVersions;
    let header_len = frame::response_header_len(frame, api.response_header_version(version))?;
    let error_code = Reader::new(&frame[LENGTH_PREFIX + header_len..]).i16()?;
    let body_version = if error_code == UNSUPPORTED_VERSION {
        0
    } else {
        version
    };
    recode_as(
        frame,
        api,
        version,
        body_version,
        |r: &mut ApiVersionsResponse| {
            versions::intersect(&mut r.api_keys);
            Ok(())
        },
    )
}

/// A request at a version keyward does not offer, answered here the way a broker answers it:
/// nothing goes to the broker.
pub(crate) fn unsupported(
    admission: Admission,
    peer: Option<std::net::IpAddr>,
    frame: &[u8],
    head: RequestHead,
) -> Step {
    versions::record_unsupported(admission, peer, frame, head.api_key, head.api_version);
    let slot = match admission {
        Admission::Downgrade => {
            Pending::Answer(versions::unsupported_api_versions(head.correlation_id))
        }
        Admission::Refuse | Admission::Forward => Pending::Close("unsupported_version"),
    };
    Step {
        upstream: None,
        slot: Some(slot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_keyward_does_not_offer_never_reach_the_broker() {
        // ApiVersions v5, correlation id 7, client id "app": keyward's own answer.
        let frame = [0, 0, 0, 13, 0, 18, 0, 5, 0, 0, 0, 7, 0, 3, b'a', b'p', b'p'];
        let head = RequestHead::parse(&frame).unwrap();
        let step = unsupported(versions::admit(18, 5), None, &frame, head);
        assert!(step.upstream.is_none());
        match step.slot {
            Some(Pending::Answer(bytes)) => {
                assert_eq!(bytes, versions::unsupported_api_versions(7))
            }
            _ => panic!("ApiVersions v5 must be answered by keyward"),
        }
        // Produce v13: closed, as a broker closes on a version it does not support.
        let frame = [0, 0, 0, 13, 0, 0, 0, 13, 0, 0, 0, 8, 0, 3, b'a', b'p', b'p'];
        let head = RequestHead::parse(&frame).unwrap();
        let step = unsupported(versions::admit(0, 13), None, &frame, head);
        assert!(step.upstream.is_none());
        assert!(matches!(
            step.slot,
            Some(Pending::Close("unsupported_version"))
        ));
    }
}
