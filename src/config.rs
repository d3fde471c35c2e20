//! Configuration: every setting is a `keygate serve` flag and a `KEYGATE_*` variable, parsed
//! into one typed tree and validated before anything starts. Secrets print as `[redacted]`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::cache::CacheSettings;
use crate::domain::key_format::{DEFAULT_SHAPE, ImportedShape, KeyShapes, Shape};
use crate::domain::scope::{Scope, ScopePolicy, parse_implications};
use crate::feed::FeedSettings;
use crate::gateway::{GatewaySettings, KeySources};
use crate::limits::LimitSettings;
use crate::server::ConnectionLimits;
use crate::service::KeyPolicy;

/// keygate: API-key authorization over gRPC.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand keygate serves, taking `serve`'s flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (the default).
    #[command(after_help = "Examples:\n  KEYGATE_ADMIN_TOKENS=\"me=$(keygate gen-token)\" keygate serve\n  \
        keygate serve --config /etc/keygate/keygate.toml")]
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit (reads the database settings of --config too).
    #[command(after_help = "Example:\n  KEYGATE_DATABASE_URL=postgres://keygate@db/keygate keygate migrate")]
    Migrate(MigrateArgs),
    /// Print a fresh random admin token, for KEYGATE_ADMIN_TOKENS.
    #[command(after_help = "Example:\n  echo \"KEYGATE_ADMIN_TOKENS=ops=$(keygate gen-token)\" >> /etc/keygate/env")]
    GenToken,
    /// The commands that talk to a running keygate (tenants, sites, keys, usage, audit, check,
    /// import) and their helpers (descriptor-set, completions).
    #[command(flatten)]
    Client(crate::cli::ClientCommand),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `keygate config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print the effective configuration (the KEYGATE_*
    /// variables apply over the file, as when serving), secrets redacted. Exit code 2 when it
    /// is not valid.
    #[command(after_help = "Example:\n  keygate config check /etc/keygate/keygate.toml")]
    Check {
        /// The TOML file.
        file: std::path::PathBuf,
    },
}

/// Flags of `keygate migrate`.
#[derive(Clone, Debug, Args)]
pub struct MigrateArgs {
    /// The configuration file whose database settings apply (as for `keygate serve`).
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// Where the database is and how many connections to hold.
#[derive(Clone, Debug, Args)]
pub struct DatabaseArgs {
    /// Database URL; the scheme picks the backend: sqlite:, postgres:, mysql:.
    #[arg(long, env = "KEYGATE_DATABASE_URL", default_value = "sqlite://keygate.db?mode=rwc", hide_env_values = true)]
    pub database_url: DatabaseUrl,
    /// Most open database connections.
    #[arg(long, env = "KEYGATE_DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,
    /// Seconds a query waits for a free connection before failing with UNAVAILABLE.
    #[arg(long, env = "KEYGATE_DB_ACQUIRE_TIMEOUT_SECONDS", default_value_t = 5)]
    pub db_acquire_timeout_seconds: u64,
    /// Milliseconds one database operation (waiting for a connection, its statements, its
    /// commit) may take before it fails with UNAVAILABLE; the database is told the same bound
    /// as its statement and lock timeouts. Migrations are not bounded.
    #[arg(long, env = "KEYGATE_DB_QUERY_TIMEOUT_MS", default_value_t = 5000)]
    pub db_query_timeout_ms: u64,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `keygate serve`.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// A TOML file holding any of these settings (names with underscores, e.g. `cache_ttl_seconds
    /// = 60`) and the `[answers]` tables; flags and KEYGATE_* variables override it.
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// The `[answers]` tables of the configuration file (no flag), set by
    /// [`config_file::parse`](crate::config_file::parse) when it read `config`.
    #[arg(skip)]
    pub answers: Option<crate::answers::AnswersFile>,
    /// Address the gRPC server listens on.
    #[arg(long, env = "KEYGATE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Admin tokens as comma-separated name=token pairs (tokens of 16 to 256 characters); the
    /// name identifies the caller in logs. Required: KeyAdmin never runs open.
    #[arg(long, env = "KEYGATE_ADMIN_TOKENS", hide_env_values = true, default_value = "")]
    pub admin_tokens: SecretText,
    /// Caller tokens for Authorize, same format. Empty: Authorize needs no caller token.
    #[arg(long, env = "KEYGATE_AUTHORIZE_TOKENS", hide_env_values = true, default_value = "")]
    pub authorize_tokens: SecretText,
    /// The shape of the keys keygate mints, e.g. `tga_{hex:64}` or `et_{env}_{hex:32}`: literal
    /// text, `{env}` (live or test), and a body of `{hex:N}`, `{alnum:N}` or `{base62:N}` whose
    /// last characters are a CRC-32. Default `kg_{env}_{hex:64}`.
    #[arg(long, env = "KEYGATE_KEY_FORMAT")]
    pub key_format: Option<String>,
    /// The older way to set the shape: `P` means `P_{env}_{hex:64}` (2 to 16 lowercase letters
    /// and digits). Cannot be set together with KEYGATE_KEY_FORMAT.
    #[arg(long, env = "KEYGATE_KEY_PREFIX")]
    pub key_prefix: Option<String>,
    /// How many characters of a key `display_prefix` shows (and logs name keys by).
    #[arg(long, env = "KEYGATE_DISPLAY_PREFIX_CHARS", default_value_t = 12)]
    pub display_prefix_chars: usize,
    /// Shapes of keys a deployment brings with it (ImportKeys), accepted by Check without a
    /// checksum: shapes in the same notation, or anchored regular expressions `^…$`, separated by
    /// whitespace.
    #[arg(long, env = "KEYGATE_IMPORTED_KEY_FORMATS", default_value = "")]
    pub imported_key_formats: String,
    /// Active-key limit of tenants whose max_keys is 0.
    #[arg(long, env = "KEYGATE_DEFAULT_MAX_KEYS", default_value_t = 10)]
    pub default_max_keys: u32,
    /// Whether every key needs a name; false lets CreateKey, UpdateKey and ImportKeys leave it
    /// empty.
    #[arg(long, env = "KEYGATE_KEY_NAME_REQUIRED", default_value_t = true, action = clap::ArgAction::Set)]
    pub key_name_required: bool,
    /// Action implications, comma-separated `higher>lower` pairs, e.g. `admin>write,write>read`.
    #[arg(long, env = "KEYGATE_SCOPE_IMPLIES", default_value = "")]
    pub scope_implies: String,
    /// Comma-separated scopes keys may hold; empty allows any well-formed scope.
    #[arg(long, env = "KEYGATE_SCOPE_CATALOGUE", default_value = "")]
    pub scope_catalogue: String,
    /// Most entries in each decision cache (keys, tenants, sites).
    #[arg(long, env = "KEYGATE_CACHE_CAPACITY", default_value_t = 100_000)]
    pub cache_capacity: u64,
    /// Seconds a found key, tenant or site stays cached.
    #[arg(long, env = "KEYGATE_CACHE_TTL_SECONDS", default_value_t = 60)]
    pub cache_ttl_seconds: u64,
    /// Seconds past the TTL that a cached key, tenant or site is still served while the
    /// database cannot be reached (fail closed for everything not cached).
    #[arg(long, env = "KEYGATE_STALE_WINDOW_SECONDS", default_value_t = 300)]
    pub stale_window_seconds: u64,
    /// Seconds an unknown key, tenant or site stays cached.
    #[arg(long, env = "KEYGATE_NEGATIVE_CACHE_TTL_SECONDS", default_value_t = 5)]
    pub negative_cache_ttl_seconds: u64,
    /// Most store lookups Check misses (unknown or uncached keys) make at once; 0 means half
    /// of KEYGATE_DB_MAX_CONNECTIONS. Beyond it, lookups wait up to the acquire timeout.
    #[arg(long, env = "KEYGATE_MAX_LOOKUPS_IN_FLIGHT", default_value_t = 0)]
    pub max_lookups_in_flight: u32,
    /// Milliseconds between two exchanges of request counts with the database, for rate limits
    /// and quotas shared by all replicas.
    #[arg(long, env = "KEYGATE_USAGE_SYNC_INTERVAL_MS", default_value_t = 500)]
    pub usage_sync_interval_ms: u64,
    /// Milliseconds between two writes of last-used times, daily usage and denied-Check audit
    /// events (one write per key per interval, never one per Check).
    #[arg(long, env = "KEYGATE_USAGE_FLUSH_INTERVAL_MS", default_value_t = 5000)]
    pub usage_flush_interval_ms: u64,
    /// Milliseconds between two reads of the change feed, through which admin changes on any
    /// replica reach this one's cache.
    #[arg(long, env = "KEYGATE_CHANGE_POLL_INTERVAL_MS", default_value_t = 100)]
    pub change_poll_interval_ms: u64,
    /// Seconds changes stay in the feed before they are pruned.
    #[arg(long, env = "KEYGATE_CHANGE_RETENTION_SECONDS", default_value_t = 3600)]
    pub change_retention_seconds: u64,
    /// Where Envoy requests carry their key, tried in order: `bearer` (Authorization: Bearer),
    /// `header:<name>`, `query:<name>`.
    #[arg(long, env = "KEYGATE_ENVOY_KEY_SOURCES", default_value = "bearer,header:x-api-key,query:_apikey")]
    pub envoy_key_sources: String,
    /// Remove the key's header or query parameter from allowed Envoy requests before they reach
    /// the upstream.
    #[arg(long, env = "KEYGATE_ENVOY_STRIP_CREDENTIALS", default_value_t = true, action = clap::ArgAction::Set)]
    pub envoy_strip_credentials: bool,
    /// Seconds a stopping server (SIGTERM, Ctrl-C) has to finish in-flight calls, write what it
    /// buffered and close the database pool.
    #[arg(long, env = "KEYGATE_SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 25)]
    pub shutdown_timeout_seconds: u64,
    /// PEM certificate chain for TLS on the gRPC listener; with --tls-key, the listener speaks
    /// only TLS.
    #[arg(long, env = "KEYGATE_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KEYGATE_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificates: when set, clients must present a certificate signed by one (mTLS).
    #[arg(long, env = "KEYGATE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Address of the Prometheus `/metrics` endpoint (plain HTTP); `off` disables it.
    #[arg(long, env = "KEYGATE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,
    /// Seconds a stopping server keeps accepting calls after it reports NOT_SERVING, so that
    /// load balancers (Kubernetes endpoints, Envoy) stop routing to it first.
    #[arg(long, env = "KEYGATE_SHUTDOWN_DRAIN_DELAY_SECONDS", default_value_t = 0)]
    pub shutdown_drain_delay_seconds: u64,
    /// Log format.
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub connections: ConnectionArgs,
}

/// Limits of the gRPC listener: what one client may take of keygate.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Connection limits")]
pub struct ConnectionArgs {
    /// Most client connections served at once; more wait in the listen backlog. Lowered at
    /// start when the open-file limit cannot hold them next to the database pool.
    #[arg(long, env = "KEYGATE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: u32,
    /// Most connections from one client address (an IPv6 client: its /64) at once; more are
    /// closed as they arrive. 0: a quarter of KEYGATE_MAX_CONNECTIONS.
    #[arg(long, env = "KEYGATE_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 0)]
    pub max_connections_per_client: u32,
    /// Most calls in flight on one connection, advertised as HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS; further streams are refused.
    #[arg(long, env = "KEYGATE_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub max_concurrent_streams: u32,
    /// Largest request header list in bytes (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
    #[arg(long, env = "KEYGATE_MAX_HEADER_LIST_BYTES", default_value_t = 16_384)]
    pub max_header_list_bytes: u32,
    /// Largest request message of KeyAdmin in bytes; a larger one is RESOURCE_EXHAUSTED.
    #[arg(long, env = "KEYGATE_MAX_MESSAGE_BYTES", default_value_t = 4_194_304)]
    pub max_message_bytes: u32,
    /// Largest Authorize or Envoy Check request in bytes (Envoy's CheckRequest carries the
    /// request's headers, and its body when `with_request_body` is set); a larger one is
    /// RESOURCE_EXHAUSTED. KEYGATE_MAX_MESSAGE_BYTES applies when it is smaller.
    #[arg(long, env = "KEYGATE_MAX_CHECK_MESSAGE_BYTES", default_value_t = 131_072)]
    pub max_check_message_bytes: u32,
    /// Seconds between the HTTP/2 PINGs keygate sends on each connection; 0 sends none.
    #[arg(long, env = "KEYGATE_HTTP2_KEEPALIVE_INTERVAL_SECONDS", default_value_t = 30)]
    pub http2_keepalive_interval_seconds: u64,
    /// Seconds a PING may go unanswered before keygate closes the connection.
    #[arg(long, env = "KEYGATE_HTTP2_KEEPALIVE_TIMEOUT_SECONDS", default_value_t = 10)]
    pub http2_keepalive_timeout_seconds: u64,
    /// Seconds a connection may have no call in flight before keygate closes it (GOAWAY).
    #[arg(long, env = "KEYGATE_CONNECTION_IDLE_TIMEOUT_SECONDS", default_value_t = 300)]
    pub connection_idle_timeout_seconds: u64,
    /// Seconds a new connection has to finish its TLS handshake and begin its first call;
    /// then it is closed.
    #[arg(long, env = "KEYGATE_HANDSHAKE_TIMEOUT_SECONDS", default_value_t = 10)]
    pub handshake_timeout_seconds: u64,
    /// Seconds after which a connection is asked to close (GOAWAY), however busy, so that no
    /// connection, not even one holding a Health.Watch stream, keeps its slot for good and
    /// clients spread over new replicas; 0 never (as grpc-go's MaxConnectionAge).
    #[arg(long, env = "KEYGATE_MAX_CONNECTION_AGE_SECONDS", default_value_t = 3600)]
    pub max_connection_age_seconds: u64,
    /// Seconds a call may take to answer before it is DEADLINE_EXCEEDED; a client's shorter
    /// grpc-timeout wins.
    #[arg(long, env = "KEYGATE_REQUEST_TIMEOUT_SECONDS", default_value_t = 30)]
    pub request_timeout_seconds: u64,
}

impl ConnectionArgs {
    fn limits(&self) -> Result<ConnectionLimits, String> {
        let at_least = |variable: &str, value: u64, minimum: u64| {
            if value < minimum { Err(format!("{variable} must be at least {minimum}")) } else { Ok(()) }
        };
        at_least("KEYGATE_MAX_CONNECTIONS", self.max_connections.into(), 1)?;
        at_least("KEYGATE_MAX_CONCURRENT_STREAMS", self.max_concurrent_streams.into(), 1)?;
        at_least("KEYGATE_MAX_HEADER_LIST_BYTES", self.max_header_list_bytes.into(), 1024)?;
        at_least("KEYGATE_MAX_MESSAGE_BYTES", self.max_message_bytes.into(), 1024)?;
        at_least("KEYGATE_HTTP2_KEEPALIVE_TIMEOUT_SECONDS", self.http2_keepalive_timeout_seconds, 1)?;
        at_least("KEYGATE_CONNECTION_IDLE_TIMEOUT_SECONDS", self.connection_idle_timeout_seconds, 1)?;
        at_least("KEYGATE_HANDSHAKE_TIMEOUT_SECONDS", self.handshake_timeout_seconds, 1)?;
        at_least("KEYGATE_MAX_CHECK_MESSAGE_BYTES", self.max_check_message_bytes.into(), 1024)?;
        let per_client = match self.max_connections_per_client {
            0 => (self.max_connections / 4).max(1),
            configured => configured.min(self.max_connections),
        };
        at_least("KEYGATE_REQUEST_TIMEOUT_SECONDS", self.request_timeout_seconds, 1)?;
        Ok(ConnectionLimits {
            max_connections: self.max_connections as usize,
            max_connections_per_client: per_client as usize,
            max_concurrent_streams: self.max_concurrent_streams,
            max_header_list_bytes: self.max_header_list_bytes,
            max_message_bytes: self.max_message_bytes as usize,
            max_check_message_bytes: self.max_check_message_bytes.min(self.max_message_bytes) as usize,
            keepalive_interval: (self.http2_keepalive_interval_seconds > 0)
                .then(|| Duration::from_secs(self.http2_keepalive_interval_seconds)),
            keepalive_timeout: Duration::from_secs(self.http2_keepalive_timeout_seconds),
            idle_timeout: Duration::from_secs(self.connection_idle_timeout_seconds),
            handshake_timeout: Duration::from_secs(self.handshake_timeout_seconds),
            max_age: (self.max_connection_age_seconds > 0)
                .then(|| Duration::from_secs(self.max_connection_age_seconds)),
            request_timeout: Duration::from_secs(self.request_timeout_seconds),
        })
    }
}

/// A setting that holds secrets (tokens); `Debug` never prints it.
#[derive(Clone, Default)]
pub struct SecretText(String);

impl SecretText {
    /// The secret itself, for the parser that turns it into something that does not print.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SecretText {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "SecretText(empty)" } else { "SecretText([redacted])" })
    }
}

/// A bearer token with a name for logs. `Debug` shows the name only.
#[derive(Clone)]
pub struct NamedToken {
    pub name: String,
    digest: [u8; 32],
}

impl fmt::Debug for NamedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamedToken({}, [redacted])", self.name)
    }
}

/// The tokens one API accepts, compared in constant time.
#[derive(Clone, Debug, Default)]
pub struct TokenSet(Vec<NamedToken>);

impl TokenSet {
    /// Parses `name=token,name=token`. Names are 1 to 64 of `[A-Za-z0-9._-]`, tokens 16 to 256
    /// printable characters without spaces or commas.
    pub fn parse(setting: &str, value: &str) -> Result<Self, String> {
        let mut names = BTreeSet::new();
        let mut tokens = Vec::new();
        // Errors name entries by position, never by content: a mistyped entry may hold a token.
        for (index, pair) in value.split(',').map(str::trim).filter(|pair| !pair.is_empty()).enumerate() {
            let entry = index + 1;
            let (name, token) =
                pair.split_once('=').ok_or_else(|| format!("{setting}: entry {entry} must read name=token"))?;
            let name_ok = (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !name_ok {
                return Err(format!("{setting}: the name of entry {entry} must be 1 to 64 of A-Z a-z 0-9 . _ -"));
            }
            if !(16..=256).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("{setting}: the token of entry {entry} must be 16 to 256 printable characters"));
            }
            if !names.insert(name.to_owned()) {
                return Err(format!("{setting}: the name of entry {entry} appears twice"));
            }
            tokens.push(NamedToken { name: name.to_owned(), digest: Sha256::digest(token.as_bytes()).into() });
        }
        Ok(Self(tokens))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of the token equal to `presented`. Compares SHA-256 digests in constant time
    /// against every configured token, so neither length nor content leaks through timing.
    pub fn authenticate(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for token in &self.0 {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token.name.as_str());
            }
        }
        found
    }
}

/// A database URL; `Debug` hides it, since it may hold a password.
#[derive(Clone)]
pub struct DatabaseUrl(pub String);

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.0.split(':').next().unwrap_or_default();
        write!(f, "DatabaseUrl({scheme}:[redacted])")
    }
}

/// Validated database settings.
#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub url: DatabaseUrl,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// The most one store operation may take (see `KEYGATE_DB_QUERY_TIMEOUT_MS`).
    pub query_timeout: Duration,
}

impl DatabaseConfig {
    pub fn from_args(args: &DatabaseArgs) -> Result<Self, String> {
        if args.db_max_connections == 0 {
            return Err("KEYGATE_DB_MAX_CONNECTIONS must be at least 1".into());
        }
        if args.db_acquire_timeout_seconds == 0 {
            return Err("KEYGATE_DB_ACQUIRE_TIMEOUT_SECONDS must be at least 1".into());
        }
        if args.db_query_timeout_ms < 10 {
            return Err("KEYGATE_DB_QUERY_TIMEOUT_MS must be at least 10".into());
        }
        Ok(Self {
            url: sqlite_file_url(&args.database_url)?,
            max_connections: args.db_max_connections,
            acquire_timeout: Duration::from_secs(args.db_acquire_timeout_seconds),
            query_timeout: Duration::from_millis(args.db_query_timeout_ms),
        })
    }
}

/// The shapes of `KEYGATE_KEY_FORMAT` (or the older `KEYGATE_KEY_PREFIX`),
/// `KEYGATE_DISPLAY_PREFIX_CHARS` and `KEYGATE_IMPORTED_KEY_FORMATS`.
fn key_shapes(args: &ServeArgs) -> Result<KeyShapes, String> {
    let notation = match (&args.key_format, &args.key_prefix) {
        (Some(_), Some(_)) => {
            return Err("KEYGATE_KEY_FORMAT and KEYGATE_KEY_PREFIX are both set: keep KEYGATE_KEY_FORMAT".into());
        }
        (Some(format), None) => format.trim().to_owned(),
        (None, Some(prefix)) => {
            let valid = (2..=16).contains(&prefix.len())
                && prefix.starts_with(|c: char| c.is_ascii_lowercase())
                && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            if !valid {
                return Err(format!(
                    "KEYGATE_KEY_PREFIX {prefix:?} must be 2 to 16 characters: a lowercase letter, then lowercase letters or digits"
                ));
            }
            format!("{prefix}_{{env}}_{{hex:64}}")
        }
        (None, None) => DEFAULT_SHAPE.to_owned(),
    };
    let variable = if args.key_prefix.is_some() { "KEYGATE_KEY_PREFIX" } else { "KEYGATE_KEY_FORMAT" };
    let minting = Shape::parse(&notation).map_err(|error| format!("{variable}: {error}"))?;
    minting
        .check_mintable(args.display_prefix_chars)
        .map_err(|error| format!("{variable} / KEYGATE_DISPLAY_PREFIX_CHARS: {error}"))?;
    if args.display_prefix_chars < 4 {
        return Err("KEYGATE_DISPLAY_PREFIX_CHARS must be at least 4".into());
    }
    let imported = args
        .imported_key_formats
        .split_whitespace()
        .map(|notation| {
            ImportedShape::parse(notation).map_err(|error| format!("KEYGATE_IMPORTED_KEY_FORMATS: {error}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KeyShapes { minting, earlier: Vec::new(), imported, display_chars: args.display_prefix_chars })
}

/// A SQLite URL that creates its file when it does not exist (`mode=rwc` unless the URL sets a
/// mode), checked for a directory that exists; other URLs as they are. Errors say what to do.
fn sqlite_file_url(url: &DatabaseUrl) -> Result<DatabaseUrl, String> {
    let text = url.0.as_str();
    let Some(rest) = text.strip_prefix("sqlite:") else { return Ok(url.clone()) };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = path.strip_prefix("//").unwrap_or(path);
    if path.is_empty()
        || path == ":memory:"
        || query.split('&').any(|pair| pair == "memory=true" || pair == "mode=memory")
    {
        return Err("KEYGATE_DATABASE_URL: an in-memory SQLite database is not shared between keygate's \
            connections and is lost when keygate stops; give a file, e.g. sqlite:///var/lib/keygate/keygate.db"
            .into());
    }
    let directory = std::path::Path::new(path).parent().filter(|parent| !parent.as_os_str().is_empty());
    if let Some(directory) = directory
        && !directory.is_dir()
    {
        return Err(format!(
            "KEYGATE_DATABASE_URL: the directory {} does not exist; keygate creates the SQLite file, not its directory",
            directory.display()
        ));
    }
    if query.split('&').any(|pair| pair.starts_with("mode=")) {
        return Ok(url.clone());
    }
    let separator = if query.is_empty() { "?" } else { "&" };
    let with_mode = if text.contains('?') { format!("{text}{separator}mode=rwc") } else { format!("{text}?mode=rwc") };
    Ok(DatabaseUrl(with_mode))
}

/// A command-line error, with the `KEYGATE_*` variable that can set the offending flag named
/// next to it (a value from the environment is reported by clap under the flag's name only).
pub fn explain_cli_error(error: &clap::Error) -> String {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let rendered = error.render().to_string();
    let Some(ContextValue::String(argument)) = error.get(ContextKind::InvalidArg) else { return rendered };
    let long = argument.trim_start_matches('-').split([' ', '=']).next().unwrap_or_default();
    let command = Cli::command();
    let arguments = command
        .get_arguments()
        // Only `serve` and `migrate` read a configuration file: the client commands' flags have
        // variables but no file entries.
        .chain(
            command
                .get_subcommands()
                .filter(|subcommand| matches!(subcommand.get_name(), "serve" | "migrate"))
                .flat_map(|subcommand| subcommand.get_arguments()),
        )
        .collect::<Vec<_>>();
    let variable = arguments
        .iter()
        .find(|candidate| candidate.get_long() == Some(long))
        .and_then(|candidate| candidate.get_env())
        .and_then(|env| env.to_str());
    match variable {
        Some(variable) => {
            let (first, rest) = rendered.split_once('\n').unwrap_or((&rendered, ""));
            let entry = long.replace('-', "_");
            format!(
                "{first}\n  (set by the flag --{long}, the variable {variable} or `{entry}` in the configuration file)\n{rest}"
            )
        }
        None => rendered,
    }
}

/// The PEM files of the gRPC listener's TLS, read at startup. `Debug` hides the key.
#[derive(Clone)]
pub struct TlsFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// CA certificates clients must chain to (mutual TLS); `None`: no client certificate asked.
    pub client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsFiles(key: [redacted], mutual: {})", self.client_ca.is_some())
    }
}

impl TlsFiles {
    fn load(args: &ServeArgs) -> Result<Option<Self>, String> {
        let read = |variable: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|error| format!("{variable}: cannot read {}: {error}", path.display()))
        };
        match (&args.tls_cert, &args.tls_key) {
            (None, None) if args.tls_client_ca.is_some() => {
                Err("KEYGATE_TLS_CLIENT_CA needs KEYGATE_TLS_CERT and KEYGATE_TLS_KEY".into())
            }
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: read("KEYGATE_TLS_CERT", cert)?,
                key: read("KEYGATE_TLS_KEY", key)?,
                client_ca: args.tls_client_ca.as_deref().map(|ca| read("KEYGATE_TLS_CLIENT_CA", ca)).transpose()?,
            })),
            _ => Err("KEYGATE_TLS_CERT and KEYGATE_TLS_KEY go together".into()),
        }
    }
}

/// The longest a cache TTL or stale window may be, in seconds: a year.
const MAX_CACHE_SECONDS: u64 = 365 * 86_400;

/// Everything `keygate serve` needs, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub database: DatabaseConfig,
    pub admin_tokens: TokenSet,
    pub authorize_tokens: TokenSet,
    pub policy: KeyPolicy,
    pub cache: CacheSettings,
    pub gateway: GatewaySettings,
    pub feed: FeedSettings,
    /// Bound on concurrent store lookups of Check misses.
    pub max_lookups_in_flight: u32,
    pub limits: LimitSettings,
    pub shutdown_timeout: Duration,
    pub shutdown_drain_delay: Duration,
    /// Where `/metrics` is served; `None` when disabled.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS for the gRPC listener; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    pub log_format: LogFormat,
    /// What one client may take of the gRPC listener.
    pub connections: ConnectionLimits,
    /// Deny statuses, messages and bodies, and identity header names.
    pub answers: std::sync::Arc<crate::answers::Answers>,
}

impl Config {
    /// Validates the flags; every problem is reported with the variable that causes it.
    pub fn from_args(args: &ServeArgs) -> Result<Self, String> {
        let admin_tokens = TokenSet::parse("KEYGATE_ADMIN_TOKENS", args.admin_tokens.expose())?;
        if admin_tokens.is_empty() {
            return Err("KEYGATE_ADMIN_TOKENS is empty: KeyAdmin never runs open. Create a token with \
                 `keygate gen-token` and set KEYGATE_ADMIN_TOKENS=<name>=<token>"
                .into());
        }
        let authorize_tokens = TokenSet::parse("KEYGATE_AUTHORIZE_TOKENS", args.authorize_tokens.expose())?;
        let shapes = key_shapes(args)?;
        if args.default_max_keys == 0 {
            return Err("KEYGATE_DEFAULT_MAX_KEYS must be at least 1".into());
        }
        let implications =
            parse_implications(&args.scope_implies).map_err(|error| format!("KEYGATE_SCOPE_IMPLIES: {error}"))?;
        let catalogue = args
            .scope_catalogue
            .split(',')
            .map(str::trim)
            .filter(|scope| !scope.is_empty())
            .map(|scope| Scope::parse(scope).map_err(|error| format!("KEYGATE_SCOPE_CATALOGUE: {scope:?} {error}")))
            .collect::<Result<Vec<_>, _>>()?;
        let catalogue = (!catalogue.is_empty()).then_some(catalogue);
        if args.cache_capacity == 0 || args.cache_ttl_seconds == 0 {
            return Err("KEYGATE_CACHE_CAPACITY and KEYGATE_CACHE_TTL_SECONDS must be at least 1".into());
        }
        for (variable, seconds) in [
            ("KEYGATE_CACHE_TTL_SECONDS", args.cache_ttl_seconds),
            ("KEYGATE_STALE_WINDOW_SECONDS", args.stale_window_seconds),
            ("KEYGATE_NEGATIVE_CACHE_TTL_SECONDS", args.negative_cache_ttl_seconds),
        ] {
            if seconds > MAX_CACHE_SECONDS {
                return Err(format!("{variable} must be at most {MAX_CACHE_SECONDS} (a year)"));
            }
        }
        let answers = match (&args.config, &args.answers) {
            (Some(path), None) => {
                return Err(format!(
                    "{}: a configuration file is read by keygate::config_file::parse, not by clap alone",
                    path.display()
                ));
            }
            (_, answers) => answers.clone().unwrap_or_default(),
        };
        let answers = std::sync::Arc::new(crate::answers::Answers::from_file(&answers)?);
        let key_sources = KeySources::parse(&args.envoy_key_sources)
            .map_err(|error| format!("KEYGATE_ENVOY_KEY_SOURCES: {error}"))?;
        let identity = &answers.headers;
        for name in [&identity.tenant_id, &identity.key_id, &identity.scopes, &identity.site_id] {
            if key_sources.reads_header(name) {
                return Err(format!(
                    "answers.headers: {name:?} is a header keys are read from (KEYGATE_ENVOY_KEY_SOURCES), which is \
                     removed before the request goes upstream"
                ));
            }
        }
        Ok(Self {
            listen: args.listen,
            database: DatabaseConfig::from_args(&args.database)?,
            admin_tokens,
            authorize_tokens,
            policy: KeyPolicy {
                shapes,
                default_max_keys: args.default_max_keys,
                scopes: ScopePolicy::new(&implications, catalogue),
                key_names_required: args.key_name_required,
            },
            cache: CacheSettings {
                capacity: args.cache_capacity,
                ttl: Duration::from_secs(args.cache_ttl_seconds),
                negative_ttl: Duration::from_secs(args.negative_cache_ttl_seconds),
                stale_window: Duration::from_secs(args.stale_window_seconds),
            },
            gateway: GatewaySettings {
                key_sources,
                strip_credentials: args.envoy_strip_credentials,
                answers: answers.clone(),
            },
            feed: FeedSettings {
                poll_interval: Duration::from_millis(args.change_poll_interval_ms.clamp(10, 60_000)),
                retention: Duration::from_secs(args.change_retention_seconds.max(60)),
            },
            limits: LimitSettings {
                sync_interval: Duration::from_millis(args.usage_sync_interval_ms.clamp(10, 60_000)),
                usage_flush_interval: Duration::from_millis(args.usage_flush_interval_ms.clamp(10, 600_000)),
            },
            max_lookups_in_flight: match args.max_lookups_in_flight {
                0 => (args.database.db_max_connections / 2).max(1),
                limit => limit,
            },
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_seconds.max(1)),
            shutdown_drain_delay: Duration::from_secs(args.shutdown_drain_delay_seconds),
            tls: TlsFiles::load(args)?,
            metrics_listen: match args.metrics_listen.as_str() {
                "off" | "" => None,
                address => {
                    Some(address.parse().map_err(|_| format!("KEYGATE_METRICS_LISTEN: {address:?} is no address"))?)
                }
            },
            log_format: args.log_format,
            connections: args.connections.limits()?,
            answers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_by_name_and_never_print() {
        let tokens = TokenSet::parse("T", "ops=0123456789abcdef0123, ci=fedcba9876543210fedc").unwrap();
        assert_eq!(tokens.authenticate("fedcba9876543210fedc"), Some("ci"));
        assert_eq!(tokens.authenticate("0123456789abcdef0123"), Some("ops"));
        assert_eq!(tokens.authenticate("0123456789abcdef012"), None);
        assert_eq!(tokens.authenticate(""), None);
        assert!(!format!("{tokens:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn token_errors_never_echo_the_setting() {
        let secret = "0123456789abcdef0123456789abcdef";
        for value in [format!("{secret}=ops"), format!("ops {secret}"), format!("ops={secret},ops={secret}")] {
            let error = TokenSet::parse("T", &value).unwrap_err();
            assert!(!error.contains(secret), "{error}");
        }
    }

    #[test]
    fn bad_token_settings_are_rejected() {
        for bad in ["noequals", "a=short", "a b=0123456789abcdef", "a=0123456789abcdef,a=0123456789abcdefX"] {
            assert!(TokenSet::parse("T", bad).is_err(), "{bad}");
        }
        assert!(TokenSet::parse("T", "").unwrap().is_empty());
    }

    #[test]
    fn parsed_command_lines_never_print_their_secrets() {
        let cli = Cli::try_parse_from([
            "keygate",
            "--database-url",
            "postgres://keygate:hunter2@db/keygate",
            "--admin-tokens",
            "ops=0123456789abcdef0123",
            "--authorize-tokens",
            "envoy=fedcba9876543210fedc",
        ])
        .unwrap();
        let printed = format!("{cli:?}");
        for secret in ["hunter2", "0123456789abcdef0123", "fedcba9876543210fedc"] {
            assert!(!printed.contains(secret), "{secret} printed in {printed}");
        }
        let config = Config::from_args(&cli.serve).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn a_sqlite_url_creates_its_file_in_a_directory_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let url = |text: &str| sqlite_file_url(&DatabaseUrl(text.to_owned())).map(|url| url.0);
        let file = dir.path().join("new.db").display().to_string();
        assert_eq!(url(&format!("sqlite://{file}")).unwrap(), format!("sqlite://{file}?mode=rwc"));
        assert_eq!(
            url(&format!("sqlite://{file}?cache=shared")).unwrap(),
            format!("sqlite://{file}?cache=shared&mode=rwc")
        );
        assert_eq!(url(&format!("sqlite://{file}?mode=ro")).unwrap(), format!("sqlite://{file}?mode=ro"));
        assert_eq!(url("sqlite://keygate.db").unwrap(), "sqlite://keygate.db?mode=rwc", "the working directory");
        for memory in ["sqlite::memory:", "sqlite://:memory:", "sqlite://x.db?mode=memory", "sqlite://?memory=true"] {
            assert!(url(memory).unwrap_err().contains("in-memory"), "{memory}");
        }
        let missing = url("sqlite:///no/such/directory/keygate.db").unwrap_err();
        assert!(missing.contains("KEYGATE_DATABASE_URL") && missing.contains("/no/such/directory"), "{missing}");
        assert_eq!(url("postgres://db/keygate").unwrap(), "postgres://db/keygate");
    }

    #[test]
    fn command_line_errors_name_the_variable_too() {
        let error = Cli::try_parse_from(["keygate", "--listen", "nowhere"]).unwrap_err();
        let explained = explain_cli_error(&error);
        assert!(explained.contains("--listen") && explained.contains("KEYGATE_LISTEN"), "{explained}");
        let error = Cli::try_parse_from(["keygate", "--cache-ttl-seconds", "soon"]).unwrap_err();
        assert!(explain_cli_error(&error).contains("KEYGATE_CACHE_TTL_SECONDS"));
    }

    #[test]
    fn database_urls_do_not_print_passwords() {
        let url = DatabaseUrl("postgres://user:hunter2@db/keygate".into());
        assert!(!format!("{url:?}").contains("hunter2"));
    }
}
