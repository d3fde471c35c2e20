//! keygate's rules, free of I/O: key format, scopes, validation and the Check decision.

pub mod audit;
pub mod cached_key;
pub mod clock;
pub mod decision;
pub mod key;
pub mod key_format;
pub mod model;
pub mod scope;
pub mod validation;
