//! The commands that talk to a running keygate server, as an operator or a script would:
//! `tenants`, `sites`, `keys`, `usage`, `audit`, `check` and `import`. They connect with
//! [`ConnectArgs`], print tables or JSON ([`render::Output`]) and end with an [`Exit`] code
//! scripts can rely on.

pub mod admin;
pub mod check;
pub mod descriptor;
pub mod import;
pub mod render;

use clap::{CommandFactory, Subcommand};

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
    /// PEM CA certificate(s) that sign keygate's TLS certificate; needed with https:// (the
    /// system's trusted roots are not used).
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

/// Exit codes of the client commands (the README lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked for was done (or was done already); `check`: the key is allowed.
    Ok = 0,
    /// The server refused some of the request (INVALID_ARGUMENT, ALREADY_EXISTS,
    /// FAILED_PRECONDITION, RESOURCE_EXHAUSTED, ...); the message says which field and why.
    Rejected = 1,
    /// The command line or an input file is wrong.
    Usage = 2,
    /// keygate could not be reached, or refused the caller (UNAUTHENTICATED, PERMISSION_DENIED,
    /// UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, TLS).
    Unreachable = 3,
    /// What the command names does not exist (NOT_FOUND): the tenant, site or key.
    NotFound = 4,
    /// `check`: the key is denied; the output says why.
    Denied = 5,
}

/// The subcommands that talk to a running server (and their helpers), flattened into
/// `keygate`'s own.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Tenants and their plan limits: put, get.
    #[command(subcommand)]
    Tenants(admin::TenantsCommand),
    /// A tenant's sites: put, list, delete.
    #[command(subcommand)]
    Sites(admin::SitesCommand),
    /// A tenant's keys: create, get, list, update, revoke, rotate, import.
    #[command(subcommand)]
    Keys(admin::KeysCommand),
    /// A key's Checks per UTC day: allowed, and denied by reason.
    Usage(Box<admin::UsageArgs>),
    /// A tenant's audit log, oldest first: every change, and denied Checks per key and minute.
    Audit(Box<admin::AuditArgs>),
    /// Ask keygate what it decides for a key, and why (exit code 0 allowed, 5 denied).
    Check(Box<check::CheckArgs>),
    /// Import existing keys (JSON Lines) into a running keygate (the same as `keys import`).
    Import(Box<import::ImportArgs>),
    /// Write the protobuf descriptors of keygate's API (for Envoy's gRPC-JSON transcoder).
    DescriptorSet(descriptor::DescriptorSetArgs),
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  keygate completions bash > /etc/bash_completion.d/keygate\n  \
        keygate completions zsh > \"${fpath[1]}/_keygate\"\n  \
        keygate completions fish > ~/.config/fish/completions/keygate.fish")]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Runs a client command; the exit code says how it went.
pub async fn run(command: ClientCommand) -> Result<Exit, Failure> {
    match command {
        ClientCommand::Tenants(command) => admin::tenants(command).await,
        ClientCommand::Sites(command) => admin::sites(command).await,
        ClientCommand::Keys(command) => admin::keys(command).await,
        ClientCommand::Usage(args) => admin::usage(*args).await,
        ClientCommand::Audit(args) => admin::audit(*args).await,
        ClientCommand::Check(args) => check::run(*args).await,
        ClientCommand::Import(args) => import::run(*args).await,
        ClientCommand::DescriptorSet(args) => descriptor::run(args).map(|()| Exit::Ok),
        ClientCommand::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut crate::config::Cli::command(), "keygate", &mut script);
            render::print_out(&String::from_utf8_lossy(&script)).map(|()| Exit::Ok)
        }
    }
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
            tonic::Code::NotFound => Exit::NotFound,
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
        let hint = if status.code() == tonic::Code::DeadlineExceeded || all.contains("Timeout expired") {
            " (keygate did not answer in time: is it overloaded, or is its database slow?)"
        } else if all.contains("InvalidContentType") || all.contains("corrupt message") {
            " (the server does not speak TLS there: use http://)"
        } else if all.contains("certificate") || all.contains("Certificate") {
            " (check KEYGATE_CA_CERT, and KEYGATE_CLIENT_CERT/KEYGATE_CLIENT_KEY if the server wants a client certificate)"
        } else if status.code() == tonic::Code::Cancelled || all.contains("connection closed") {
            " (the server closed the connection: is KEYGATE_ADDR keygate's gRPC port? with https://, does it want a client certificate, KEYGATE_CLIENT_CERT? with http://, is it a TLS server?)"
        } else if all.contains("refused") {
            " (is keygate running, and is KEYGATE_ADDR right?)"
        } else if [
            "broken pipe",
            "frame with invalid size",
            "invalid HTTP version",
            "protocol error",
            "connection reset",
        ]
        .iter()
        .any(|symptom| all.contains(symptom))
        {
            " (what answers there does not speak gRPC: is KEYGATE_ADDR keygate's gRPC port?)"
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
        let tls = address.starts_with("https://");
        if !tls && !address.starts_with("http://") {
            return Err(Failure::usage(format!(
                "KEYGATE_ADDR {:?}: use http://host:port, or https://host:port for TLS",
                self.addr
            )));
        }
        if !tls && (self.ca_cert.is_some() || self.client_cert.is_some()) {
            // Asked for TLS settings but not for TLS: never send the token in plaintext then.
            return Err(Failure::usage(format!(
                "KEYGATE_CA_CERT or KEYGATE_CLIENT_CERT is set but KEYGATE_ADDR {:?} is not https://",
                self.addr
            )));
        }
        let mut endpoint = Endpoint::from_shared(address.clone())
            .map_err(|_| Failure::usage(format!("KEYGATE_ADDR {:?} is no address (http://host:port)", self.addr)))?
            .connect_timeout(std::time::Duration::from_secs(5));
        if tls {
            let read = |variable: &str, path: &PathBuf| {
                let pem = std::fs::read(path)
                    .map_err(|error| Failure::usage(format!("{variable}: cannot read {}: {error}", path.display())))?;
                match String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
                    true => Ok(pem),
                    false => Err(Failure::usage(format!("{variable}: {} is not PEM", path.display()))),
                }
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
        bearer(token, "KEYGATE_ADMIN_TOKEN")
    }
}

/// `Bearer <token>` as an `authorization` value; `variable` names where the token came from
/// when it holds characters a header cannot.
pub fn bearer(token: &str, variable: &str) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, Failure> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| Failure::usage(format!("{variable} holds characters a header cannot")))
}
