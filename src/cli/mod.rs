//! The commands that talk to a running keygate server, as an operator or a script would:
//! `keygate import` (moving existing keys in). They connect with [`ConnectArgs`] and end with
//! an [`Exit`] code scripts can rely on.

pub mod import;

use std::path::PathBuf;

use clap::Args;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::SecretText;

/// How a command reaches keygate. The admin token comes from `KEYGATE_ADMIN_TOKEN` (keep it
/// out of the command line, where shell history keeps it).
#[derive(Clone, Debug, Args)]
pub struct ConnectArgs {
    /// keygate's gRPC address: http://host:port, or https://host:port for TLS.
    #[arg(long, env = "KEYGATE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// PEM CA certificate(s) that sign keygate's TLS certificate (https only; default: the
    /// system's roots are not used, so this is needed for TLS).
    #[arg(long, env = "KEYGATE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS.
    #[arg(long, env = "KEYGATE_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, env = "KEYGATE_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// An admin token (one of KEYGATE_ADMIN_TOKENS' tokens, without its name).
    #[arg(long, env = "KEYGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretText>,
}

/// Exit codes of the client commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked for was done (or was done already).
    Ok = 0,
    /// The server refused some of the request (invalid or conflicting input); the output says
    /// which.
    Rejected = 1,
    /// The command line or an input file is wrong.
    Usage = 2,
    /// keygate could not be reached, or refused the caller (token, TLS).
    Unreachable = 3,
}

/// A failed command: what to tell the user, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Self { exit: Exit::Usage, message: message.into() }
    }

    pub fn unreachable(message: impl Into<String>) -> Self {
        Self { exit: Exit::Unreachable, message: message.into() }
    }

    /// A failed call, in plain words with its gRPC code.
    pub fn from_status(status: &tonic::Status) -> Self {
        let exit = match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Internal => Exit::Unreachable,
            _ => Exit::Rejected,
        };
        Self { exit, message: describe_status(status) }
    }

    /// A failed call to keygate at `addr`: when the connection itself failed, what failed and
    /// what to check, rather than the transport's words.
    pub fn from_call(status: &tonic::Status, addr: &str) -> Self {
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(status);
        while let Some(error) = source {
            causes.push(error.to_string());
            source = error.source();
        }
        if causes.is_empty() && status.code() != tonic::Code::Cancelled {
            return Self::from_status(status);
        }
        let all = causes.join(": ");
        let hint = if all.contains("InvalidContentType") || all.contains("corrupt message") {
            " (the server does not speak TLS there: use http://)"
        } else if all.contains("certificate") || all.contains("Certificate") {
            " (check KEYGATE_CA_CERT, and KEYGATE_CLIENT_CERT/KEYGATE_CLIENT_KEY if the server wants a client certificate)"
        } else if status.code() == tonic::Code::Cancelled || all.contains("connection closed") {
            " (the server closed the connection: with https://, does it want a client certificate, KEYGATE_CLIENT_CERT? with http://, is it a TLS server?)"
        } else if all.contains("refused") {
            " (is keygate running, and is KEYGATE_ADDR right?)"
        } else {
            ""
        };
        let cause = causes.last().cloned().unwrap_or_else(|| status.message().to_owned());
        Self::unreachable(format!("cannot reach keygate at {addr}: {cause}{hint}"))
    }
}

/// A gRPC error in plain words: its code, its message and the fields a BadRequest names.
pub fn describe_status(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let code = format!("{:?}", status.code());
    let mut text = format!("{} ({})", status.message(), screaming(&code));
    if let Some(bad_request) = status.get_error_details().bad_request() {
        let fields: Vec<String> = bad_request
            .field_violations
            .iter()
            .map(|violation| format!("{}: {}", violation.field, violation.description))
            .collect();
        if !fields.is_empty() && !status.message().contains(&fields[0]) {
            text = format!("{} ({})", fields.join("; "), screaming(&code));
        }
    }
    text
}

/// `InvalidArgument` as `INVALID_ARGUMENT`.
fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (index, character) in camel.chars().enumerate() {
        if character.is_uppercase() && index > 0 {
            out.push('_');
        }
        out.push(character.to_ascii_uppercase());
    }
    out
}

impl ConnectArgs {
    /// A channel to keygate (connected lazily: the first call reports an unreachable server).
    pub fn channel(&self) -> Result<Channel, Failure> {
        let address = self.address();
        let mut endpoint = Endpoint::from_shared(address.clone())
            .map_err(|_| Failure::usage(format!("KEYGATE_ADDR {:?} is no address (http://host:port)", self.addr)))?
            .connect_timeout(std::time::Duration::from_secs(5));
        if address.starts_with("https://") {
            let read = |variable: &str, path: &PathBuf| {
                std::fs::read(path)
                    .map_err(|error| Failure::usage(format!("{variable}: cannot read {}: {error}", path.display())))
            };
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca_cert {
                tls = tls.ca_certificate(Certificate::from_pem(read("KEYGATE_CA_CERT", ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                tls = tls
                    .identity(Identity::from_pem(read("KEYGATE_CLIENT_CERT", cert)?, read("KEYGATE_CLIENT_KEY", key)?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|error| Failure::usage(format!("TLS settings: {error}")))?;
        }
        Ok(endpoint.connect_lazy())
    }

    /// KEYGATE_ADDR with its scheme: `host:port` (as grpcurl takes it) means `http://host:port`.
    pub fn address(&self) -> String {
        match self.addr.contains("://") {
            true => self.addr.clone(),
            false => format!("http://{}", self.addr),
        }
    }

    /// The `authorization` value of admin calls.
    pub fn bearer(&self) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, Failure> {
        let token = self.admin_token.as_ref().map(SecretText::expose).filter(|token| !token.is_empty());
        let token = token.ok_or_else(|| Failure::usage("set KEYGATE_ADMIN_TOKEN to an admin token"))?;
        format!("Bearer {token}")
            .parse()
            .map_err(|_| Failure::usage("KEYGATE_ADMIN_TOKEN holds characters a header cannot"))
    }
}
