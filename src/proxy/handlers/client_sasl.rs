//! SaslHandshake and SaslAuthenticate: the client's own SASL exchange with the broker, relayed
//! untouched and watched (the mechanism, the claimed user, whether the broker accepted a round),
//! so keyward knows who a connection speaks for (`crate::proxy::identity`). Not to be confused
//! with `crate::proxy::sasl`, keyward's own login on the connections it opens itself.

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use tracing::warn;

use super::{CONN_LOG, Handling, Rewrite, Step, handling};
use crate::codec::frame::RequestHead;
use crate::proxy::Shared;
use crate::proxy::identity::{self, Identity, Requirement};

/// A client starts SASL. When keyward was told the cluster does not authenticate clients, the
/// broker's answer decides ([`handshake_answered`]): a listener without SASL refuses the
/// handshake (the client sees that refusal, as it would directly); one that accepts it shows the
/// misconfiguration, and the connection is closed rather than act for clients keyward cannot
/// tell apart.
pub(crate) fn handshake(frame: Bytes, head: RequestHead, identity: &Identity) -> Step {
    if let Some(mechanism) = identity::handshake_mechanism(&frame, head.api_version) {
        identity.set_mechanism(&mechanism);
    }
    let rewrite = match identity.requirement {
        Requirement::None { .. } => Rewrite::SaslHandshake(head.api_version),
        Requirement::Sasl => Rewrite::Passthrough,
    };
    Step::forward(frame, head.correlation_id, Handling::Rewrite(rewrite))
}

/// The broker's answer to a SaslHandshake keyward was told no cluster would accept: whether the
/// connection must close (the broker accepted it), saying why once in a while.
pub(crate) fn handshake_answered(
    shared: &Shared,
    cluster: usize,
    frame: &[u8],
    version: i16,
) -> bool {
    if identity::response_error(frame, ApiKey::SaslHandshake, version) != Some(0) {
        return false;
    }
    if shared.rejection_log.allow() {
        let name = &shared.clusters.get(cluster).name;
        warn!(
            target: CONN_LOG,
            "cluster {name} accepts a client's SASL handshake, but clusters.{name}.client_auth is none (or unset, and keyward has no sasl for {name}); closing the connection: set client_auth: sasl and keyward's own clusters.{name}.sasl"
        );
    }
    true
}

/// A client's SaslAuthenticate round: the first names the user the client claims to be.
pub(crate) fn authenticate(frame: Bytes, head: RequestHead, identity: &Identity) -> Step {
    if let Some(auth) = identity::authenticate_bytes(&frame, head.api_version) {
        identity.claim_user(&auth);
    }
    Step::forward(
        frame,
        head.correlation_id,
        handling(ApiKey::SaslAuthenticate, head.api_version),
    )
}

/// The broker's answer to a SaslAuthenticate round, passed on untouched: its error code tells
/// whether the broker accepted the client's SASL step.
pub(crate) fn answered(frame: &[u8], version: i16, identity: &Identity) {
    if let Some(code) = identity::response_error(frame, ApiKey::SaslAuthenticate, version) {
        identity.sasl_answered(code);
    }
}
