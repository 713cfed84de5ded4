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

/// A client starts SASL. When keyward was told the cluster does not authenticate clients, that
/// is a misconfiguration: keyward would be acting for clients it cannot tell apart, so it
/// closes the connection instead.
pub(crate) fn handshake(
    shared: &Shared,
    cluster: usize,
    frame: Bytes,
    head: RequestHead,
    identity: &Identity,
) -> Step {
    if let Requirement::None { .. } = identity.requirement {
        if shared.rejection_log.allow() {
            let name = &shared.clusters.get(cluster).name;
            warn!(
                target: CONN_LOG,
                "a client starts SASL, but clusters.{name}.client_auth is none (or unset, and keyward has no sasl for {name}); closing the connection: set client_auth: sasl and keyward's own clusters.{name}.sasl"
            );
        }
        return Step::close("client_auth_mismatch");
    }
    if let Some(mechanism) = identity::handshake_mechanism(&frame, head.api_version) {
        identity.set_mechanism(&mechanism);
    }
    Step::forward(
        frame,
        head.correlation_id,
        Handling::Rewrite(Rewrite::Passthrough),
    )
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
    if let Some(code) = identity::authenticate_error(frame, version) {
        identity.sasl_answered(code);
    }
}
