//! ApiVersions: the broker's answer is intersected with what keyward decodes and rewrites (see
//! [`crate::proxy::versions`]), so clients negotiate only versions keyward can handle.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

use crate::codec::errors::UNSUPPORTED_VERSION;
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::wire::Reader;
use crate::proxy::rewrite::{RewriteError, recode_as};
use crate::proxy::versions;

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
