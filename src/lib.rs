//! keygate: a self-hosted API-key authorization service over gRPC.
//!
//! Flow of a request: [`grpc`] adapters decode it, [`service`] applies the rules of [`domain`]
//! over the [`cache`] and the [`store`], and the adapters encode the answer. [`server::App`]
//! wires it together; `main.rs` only parses configuration and runs it.

pub mod answers;
pub mod cache;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod domain;
pub mod feed;
pub mod gateway;
pub mod grpc;
pub mod known;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod usage;

/// The generated `keygate.v1` messages, clients and servers.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("keygate.v1");

    /// The encoded descriptors of `keygate.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keygate_descriptor");

    /// The encoded descriptors of Envoy's `envoy.service.auth.v3.Authorization` and everything
    /// it imports, served by reflection (the code itself comes from the envoy-types crate).
    pub const ENVOY_EXT_AUTHZ_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("envoy_ext_authz_descriptor");

    use std::fmt;

    // Messages that carry a full key print it redacted, so a `{:?}` in a log never leaks one.
    impl fmt::Debug for CheckRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CheckRequest")
                .field("key", &"[redacted]")
                .field("scope", &self.scope)
                .field("site_id", &self.site_id)
                .finish()
        }
    }

    impl fmt::Debug for CreateKeyResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateKeyResponse").field("key", &self.key).field("secret", &"[redacted]").finish()
        }
    }

    impl fmt::Debug for ImportedKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let credential = match &self.credential {
                Some(imported_key::Credential::Secret(_)) => "secret: [redacted]",
                Some(imported_key::Credential::SecretSha256(_)) => "secret_sha256: [given]",
                None => "none",
            };
            f.debug_struct("ImportedKey")
                .field("credential", &credential)
                .field("display_prefix", &self.display_prefix)
                .field("name", &self.name)
                .field("scopes", &self.scopes)
                .finish_non_exhaustive()
        }
    }

    impl fmt::Debug for RotateKeyResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("RotateKeyResponse")
                .field("key", &self.key)
                .field("secret", &"[redacted]")
                .field("previous_key", &self.previous_key)
                .finish()
        }
    }
}
