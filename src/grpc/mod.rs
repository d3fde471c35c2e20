//! The gRPC adapters: decode requests, call the services, encode responses.

mod admin;
mod auth;
mod authorize;
mod convert;
mod envoy;
mod status;

pub use admin::KeyAdminApi;
pub use auth::{BearerAuth, bearer_token};
pub use authorize::AuthorizeApi;
pub use envoy::EnvoyAuthorizationApi;
