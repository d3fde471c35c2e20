//! `keygate tenants|sites|keys|usage|audit ...`: KeyAdmin from the command line. Each command is
//! one RPC (lists: every page of it), printed as a table for people or as the response message
//! in JSON for scripts (`--output json`, see [`Output`]).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use clap::{Args, Subcommand, ValueEnum};
use prost_types::{FieldMask, Timestamp};
use tonic::transport::Channel;

use super::render::{self, Output, absolute, enum_word, fields, list, relative, table};
use super::{ConnectArgs, Exit, Failure};
use crate::proto::key_admin_client::KeyAdminClient;
use crate::proto::*;

/// Connection and output flags every client command takes.
#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts (one JSON document on standard output).
    #[arg(long, short = 'o', env = "KEYGATE_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `keygate tenants ...`.
#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant, or change the settings given (the others keep their values).
    #[command(after_help = "Examples:\n  keygate tenants put acme --display-name 'Acme Inc' --max-keys 25 \\\n    \
        --rate-limit-per-minute 600 --daily-request-quota 100000\n  \
        keygate tenants put acme --api-access false      # every key of acme is denied PLAN_REQUIRED")]
    Put(Box<TenantPutArgs>),
    /// Show a tenant and its plan limits.
    #[command(after_help = "Example:\n  keygate tenants get acme")]
    Get(TenantGetArgs),
}

/// Flags of `keygate tenants put`.
#[derive(Clone, Debug, Args)]
pub struct TenantPutArgs {
    /// The tenant's id: 1 to 64 of `A-Z a-z 0-9 . _ -` (case-sensitive).
    pub tenant: String,
    /// A name for people (a new tenant gets its id).
    #[arg(long)]
    pub display_name: Option<String>,
    /// Whether its keys may be used at all (false denies every Check PLAN_REQUIRED).
    #[arg(long)]
    pub api_access: Option<bool>,
    /// Most keys it may hold; 0 means the server's default (KEYGATE_DEFAULT_MAX_KEYS).
    #[arg(long)]
    pub max_keys: Option<u32>,
    /// No limit on its number of keys (max_keys no longer applies).
    #[arg(long)]
    pub unlimited_keys: Option<bool>,
    /// Requests per minute of each key, unless a key sets its own; 0 means no limit.
    #[arg(long)]
    pub rate_limit_per_minute: Option<u32>,
    /// Checks per UTC day across all its keys; 0 means no quota.
    #[arg(long)]
    pub daily_request_quota: Option<u32>,
    /// Requests per --shared-rate-limit-window across all its keys together; 0 means none.
    #[arg(long)]
    pub shared_rate_limit: Option<u32>,
    /// The window of --shared-rate-limit.
    #[arg(long, value_enum)]
    pub shared_rate_limit_window: Option<Window>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// A rate-limit window.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Window {
    Second,
    Minute,
    Hour,
    Day,
}

/// Flags of `keygate tenants get`.
#[derive(Clone, Debug, Args)]
pub struct TenantGetArgs {
    /// The tenant's id.
    pub tenant: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `keygate sites ...`.
#[derive(Debug, Subcommand)]
pub enum SitesCommand {
    /// Create a site of a tenant, or rename it. A site id belongs to the first tenant that creates it.
    #[command(after_help = "Example:\n  keygate sites put --tenant acme shop.example --display-name Shop")]
    Put(SitePutArgs),
    /// List a tenant's sites (every page).
    #[command(after_help = "Example:\n  keygate sites list --tenant acme")]
    List(TenantArgs),
    /// Delete a site. Keys restricted to it keep the restriction, and so lose access to it.
    #[command(after_help = "Example:\n  keygate sites delete --tenant acme blog.example")]
    Delete(SiteArgs),
}

/// `--tenant`, for commands that need nothing else.
#[derive(Clone, Debug, Args)]
pub struct TenantArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `keygate sites put`.
#[derive(Clone, Debug, Args)]
pub struct SitePutArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// The site's id, as Check names it (for example its host name).
    pub site: String,
    /// A name for people, at most 200 characters (default: the site id).
    #[arg(long, default_value = "")]
    pub display_name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// A tenant's site.
#[derive(Clone, Debug, Args)]
pub struct SiteArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// The site's id.
    pub site: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `keygate keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Mint a key. Its secret is printed once: keygate keeps only its hash.
    #[command(after_help = "Examples:\n  keygate keys create --tenant acme --name 'Data warehouse sync' \\\n    \
        --scope analytics:read --scope 'goals:*' --site shop.example --expires-in 30d\n  \
        # In a script, standard output is the secret alone:\n  \
        SECRET=$(keygate keys create --tenant acme --name CI --scope events:write)")]
    Create(Box<KeyCreateArgs>),
    /// Show a key (never its secret).
    #[command(after_help = "Example:\n  keygate keys get --tenant acme key_01a23274162532b8e42d9b68")]
    Get(KeyArgs),
    /// List a tenant's keys (every page), oldest first.
    #[command(after_help = "Examples:\n  keygate keys list --tenant acme\n  \
        keygate keys list --tenant acme --include-revoked --site shop.example --output json")]
    List(KeyListArgs),
    /// Change a key's name, scopes, sites, expiry, metadata or rate limit (only what is given).
    #[command(
        after_help = "Examples:\n  keygate keys update --tenant acme key_01a23274162532b8e42d9b68 --name 'Warehouse (nightly)' --scope analytics:read\n  \
        keygate keys update --tenant acme key_01a23274162532b8e42d9b68 --all-sites --no-expiry"
    )]
    Update(Box<KeyUpdateArgs>),
    /// Revoke a key at once (revoking a revoked key changes nothing).
    #[command(after_help = "Example:\n  keygate keys revoke --tenant acme key_01a23274162532b8e42d9b68")]
    Revoke(KeyArgs),
    /// Mint a successor with the same settings; the old key works on for --grace-period.
    #[command(
        after_help = "Example:\n  keygate keys rotate --tenant acme key_01a23274162532b8e42d9b68 --grace-period 1h"
    )]
    Rotate(KeyRotateArgs),
    /// Import existing keys (JSON Lines), as `keygate import` does.
    #[command(after_help = "Example:\n  keygate keys import --tenant acme keys.jsonl")]
    Import(Box<super::import::ImportArgs>),
}

/// Flags of `keygate keys create`.
#[derive(Clone, Debug, Args)]
pub struct KeyCreateArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// What the key is for, 1 to 100 characters.
    #[arg(long)]
    pub name: String,
    /// A scope it grants: `resource:action`, `resource:*` or `*` (repeat, or separate with commas).
    #[arg(long = "scope", required = true, value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// A site it is restricted to (repeat, or commas); none means all the tenant's sites.
    #[arg(long = "site", value_delimiter = ',')]
    pub sites: Vec<String>,
    /// When it stops working, from now: `30d`, `12h`, `90min`.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "expires_at")]
    pub expires_in: Option<Duration>,
    /// When it stops working, in RFC 3339: `2027-01-31T00:00:00Z`.
    #[arg(long, value_parser = parse_time)]
    pub expires_at: Option<DateTime<Utc>>,
    /// `live` (default) or `test`: shown in the key's prefix.
    #[arg(long, value_enum)]
    pub environment: Option<Environment>,
    /// `name=value`, returned by Check (repeat; at most 16).
    #[arg(long = "metadata", value_parser = parse_pair)]
    pub metadata: Vec<(String, String)>,
    /// Its own requests per minute; unset means the tenant's.
    #[arg(long)]
    pub rate_limit_per_minute: Option<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// A key's environment.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Environment {
    Live,
    Test,
}

/// A tenant's key.
#[derive(Clone, Debug, Args)]
pub struct KeyArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// The key's id (`key_…`).
    pub key_id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `keygate keys list`.
#[derive(Clone, Debug, Args)]
pub struct KeyListArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// Also list revoked keys (expired ones are always listed).
    #[arg(long)]
    pub include_revoked: bool,
    /// Only keys restricted to this site.
    #[arg(long)]
    pub site: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `keygate keys update`.
#[derive(Clone, Debug, Args)]
pub struct KeyUpdateArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// The key's id.
    pub key_id: String,
    /// A new name.
    #[arg(long)]
    pub name: Option<String>,
    /// Its scopes from now on, replacing all of them (repeat, or commas).
    #[arg(long = "scope", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// Its sites from now on, replacing all of them (repeat, or commas).
    #[arg(long = "site", value_delimiter = ',', conflicts_with = "all_sites")]
    pub sites: Vec<String>,
    /// Lift its site restriction.
    #[arg(long)]
    pub all_sites: bool,
    /// A new expiry from now (`30d`).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["expires_at", "no_expiry"])]
    pub expires_in: Option<Duration>,
    /// A new expiry in RFC 3339.
    #[arg(long, value_parser = parse_time, conflicts_with = "no_expiry")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Make it never expire.
    #[arg(long)]
    pub no_expiry: bool,
    /// Its metadata from now on, `name=value`, replacing all of it (repeat).
    #[arg(long = "metadata", value_parser = parse_pair, conflicts_with = "no_metadata")]
    pub metadata: Vec<(String, String)>,
    /// Remove all its metadata.
    #[arg(long)]
    pub no_metadata: bool,
    /// Its own requests per minute; 0 means the tenant's.
    #[arg(long)]
    pub rate_limit_per_minute: Option<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `keygate keys rotate`.
#[derive(Clone, Debug, Args)]
pub struct KeyRotateArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// The key's id.
    pub key_id: String,
    /// How long the old key keeps working (`1h`, at most 30 days); 0 revokes it now.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub grace_period: Duration,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `keygate usage`.
#[derive(Clone, Debug, Args)]
#[command(after_help = "Examples:\n  keygate usage --tenant acme key_01a23274162532b8e42d9b68\n  \
    keygate usage --tenant acme key_01a23274162532b8e42d9b68 --from 2026-11-01 --to 2026-11-30 --output json")]
pub struct UsageArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// The key's id.
    pub key_id: String,
    /// First day (UTC), YYYY-MM-DD; default: 29 days before --to.
    #[arg(long, value_parser = parse_date)]
    pub from: Option<NaiveDate>,
    /// Last day (UTC), YYYY-MM-DD; default: today.
    #[arg(long, value_parser = parse_date)]
    pub to: Option<NaiveDate>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `keygate audit`.
#[derive(Clone, Debug, Args)]
#[command(after_help = "Examples:\n  keygate audit --tenant acme --since 24h\n  \
    keygate audit --tenant acme --key key_01a23274162532b8e42d9b68 --type key-revoked,check-denied --output json")]
pub struct AuditArgs {
    /// The tenant.
    #[arg(long, env = "KEYGATE_TENANT")]
    pub tenant: String,
    /// Only events of this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only events of these types (repeat, or commas).
    #[arg(long = "type", value_delimiter = ',', value_parser = event_type_parser())]
    pub types: Vec<AuditEventType>,
    /// Only events at or after this time: RFC 3339, a UTC day (YYYY-MM-DD), or how long ago
    /// (`24h`, `7d`).
    #[arg(long, value_parser = parse_time_or_ago)]
    pub since: Option<DateTime<Utc>>,
    /// Only events before this time: RFC 3339, a UTC day, or how long ago.
    #[arg(long, value_parser = parse_time_or_ago)]
    pub until: Option<DateTime<Utc>>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `--type`'s values: the audit vocabulary of [`crate::domain::audit::AuditEventType`] in
/// kebab case (`key-created`), each read as the `keygate.v1.AuditEventType` it names.
fn event_type_parser() -> impl clap::builder::TypedValueParser<Value = AuditEventType> {
    use clap::builder::TypedValueParser;
    let names =
        crate::domain::audit::AuditEventType::ALL.map(|kind| kind.as_str().to_ascii_lowercase().replace('_', "-"));
    clap::builder::PossibleValuesParser::new(names).map(|name| {
        let name = format!("AUDIT_EVENT_TYPE_{}", name.to_ascii_uppercase().replace('-', "_"));
        AuditEventType::from_str_name(&name).unwrap_or(AuditEventType::Unspecified)
    })
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|_| "not an RFC 3339 time such as 2027-01-31T00:00:00Z".to_owned())
}

/// A day as exactly `YYYY-MM-DD` (chrono alone would take `26-1-1` as the year 26).
fn parse_date(text: &str) -> Result<NaiveDate, String> {
    let shaped = text.len() == 10
        && text.bytes().enumerate().all(|(index, byte)| match index {
            4 | 7 => byte == b'-',
            _ => byte.is_ascii_digit(),
        });
    let date = shaped.then(|| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()).flatten();
    date.filter(|date| date.year() >= 1970).ok_or_else(|| "not a day as YYYY-MM-DD (from 1970 on)".to_owned())
}

fn parse_time_or_ago(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        let ago = chrono::Duration::from_std(ago).map_err(|_| "too long ago".to_owned())?;
        return Utc::now().checked_sub_signed(ago).ok_or_else(|| "too long ago".to_owned());
    }
    if let Ok(day) = parse_date(text) {
        return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    parse_time(text).map_err(|_| "neither an RFC 3339 time, a day (YYYY-MM-DD) nor a duration such as 24h".to_owned())
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| "expected name=value".to_owned())
}

/// `--metadata` pairs as a map; a name given twice is a usage error, not a silent overwrite.
fn metadata_map(pairs: &[(String, String)]) -> Result<HashMap<String, String>, Failure> {
    let mut map = HashMap::new();
    for (name, value) in pairs {
        if map.insert(name.clone(), value.clone()).is_some() {
            return Err(Failure::usage(format!("--metadata {name:?} is given twice")));
        }
    }
    Ok(map)
}

fn timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
}

fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: duration.subsec_nanos() as i32,
    }
}

/// A connected KeyAdmin client that sends the admin token with every call.
struct Admin {
    client: KeyAdminClient<Channel>,
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    address: String,
}

impl Admin {
    fn connect(connect: &ConnectArgs) -> Result<Self, Failure> {
        let bearer = connect.bearer()?;
        let client = KeyAdminClient::new(connect.channel()?).max_decoding_message_size(64 << 20);
        Ok(Self { client, bearer, address: connect.address() })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", self.bearer.clone());
        request.set_timeout(Duration::from_secs(30));
        request
    }

    fn failed(&self, status: tonic::Status) -> Failure {
        Failure::from_call(&status, &self.address)
    }
}

/// Every page of a list RPC: `call` gets a page token and returns the page's items and the
/// next token. A server that hands out the same token twice is an error, not an endless loop.
async fn every_page<T, F, Fut>(admin: &Admin, mut call: F) -> Result<Vec<T>, Failure>
where
    F: FnMut(&Admin, String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    let mut seen = std::collections::HashSet::new();
    loop {
        let (page, next) = match call(admin, token).await {
            Ok(page) => page,
            Err(status) => return Err(admin.failed(status)),
        };
        items.extend(page);
        if next.is_empty() {
            return Ok(items);
        }
        if !seen.insert(next.clone()) {
            return Err(Failure::unreachable("the server repeated a page token; stopping"));
        }
        token = next;
    }
}

/// Prints a response: `name` is its message's full name for JSON; `human` its table. A list
/// joined from its pages is printed without its (empty) page token.
fn show<M: prost::Message>(
    output: Output,
    message: &M,
    name: &str,
    human: impl FnOnce() -> String,
) -> Result<(), Failure> {
    match output {
        Output::Json => {
            let mut value = render::json(message, name)?;
            if let Some(object) = value.as_object_mut() {
                object.remove("next_page_token");
            }
            render::print_json(&value)
        }
        Output::Table => render::print_out(&human()),
    }
}

/// Runs `keygate tenants ...`.
pub async fn tenants(command: TenantsCommand) -> Result<Exit, Failure> {
    match command {
        TenantsCommand::Put(args) => {
            let mut admin = Admin::connect(&args.client.connect)?;
            let window = args.shared_rate_limit_window.map(|window| match window {
                Window::Second => RateLimitWindow::Second,
                Window::Minute => RateLimitWindow::Minute,
                Window::Hour => RateLimitWindow::Hour,
                Window::Day => RateLimitWindow::Day,
            });
            let request = admin.request(PutTenantRequest {
                tenant_id: args.tenant.clone(),
                display_name: args.display_name.clone(),
                api_access_enabled: args.api_access,
                max_keys: args.max_keys,
                rate_limit_per_minute: args.rate_limit_per_minute,
                daily_request_quota: args.daily_request_quota,
                unlimited_keys: args.unlimited_keys,
                shared_rate_limit: args.shared_rate_limit,
                shared_rate_limit_window: window.unwrap_or(RateLimitWindow::Unspecified).into(),
            });
            let response = admin.client.put_tenant(request).await.map_err(|status| admin.failed(status))?;
            let response = response.into_inner();
            show(args.client.output, &response, "keygate.v1.PutTenantResponse", || {
                tenant_fields(response.tenant.as_ref())
            })?;
        }
        TenantsCommand::Get(args) => {
            let mut admin = Admin::connect(&args.client.connect)?;
            let request = admin.request(GetTenantRequest { tenant_id: args.tenant.clone() });
            let response = admin.client.get_tenant(request).await.map_err(|status| admin.failed(status))?;
            let response = response.into_inner();
            show(args.client.output, &response, "keygate.v1.GetTenantResponse", || {
                tenant_fields(response.tenant.as_ref())
            })?;
        }
    }
    Ok(Exit::Ok)
}

fn limit(value: u32, unit: &str, zero: &str) -> String {
    match value {
        0 => zero.to_owned(),
        value => format!("{value} {unit}"),
    }
}

fn tenant_fields(tenant: Option<&Tenant>) -> String {
    let Some(tenant) = tenant else { return String::new() };
    let window = enum_word(tenant.shared_rate_limit_window().as_str_name(), "RATE_LIMIT_WINDOW_");
    fields(vec![
        ("tenant", tenant.tenant_id.clone()),
        ("name", tenant.display_name.clone()),
        ("api access", if tenant.api_access_enabled { "enabled" } else { "disabled" }.to_owned()),
        (
            "max keys",
            match tenant.unlimited_keys {
                true => "unlimited".to_owned(),
                false if tenant.max_keys == 0 => format!("{} (server default)", tenant.effective_max_keys),
                false => tenant.effective_max_keys.to_string(),
            },
        ),
        ("rate limit", limit(tenant.rate_limit_per_minute, "per minute per key", "none")),
        ("daily quota", limit(tenant.daily_request_quota, "Checks per UTC day", "none")),
        ("shared limit", limit(tenant.shared_rate_limit, &format!("per {window}, all keys together"), "none")),
        ("created", absolute(tenant.created_at.as_ref(), "-")),
        ("updated", absolute(tenant.updated_at.as_ref(), "-")),
    ])
}

/// Runs `keygate sites ...`.
pub async fn sites(command: SitesCommand) -> Result<Exit, Failure> {
    match command {
        SitesCommand::Put(args) => {
            let mut admin = Admin::connect(&args.client.connect)?;
            let request = admin.request(PutSiteRequest {
                tenant_id: args.tenant.clone(),
                site_id: args.site.clone(),
                display_name: args.display_name.clone(),
            });
            let response = admin.client.put_site(request).await.map_err(|status| admin.failed(status))?;
            let response = response.into_inner();
            show(args.client.output, &response, "keygate.v1.PutSiteResponse", || {
                let site = response.site.clone().unwrap_or_default();
                fields(vec![
                    ("tenant", site.tenant_id),
                    ("site", site.site_id),
                    ("name", site.display_name),
                    ("created", absolute(site.created_at.as_ref(), "-")),
                    ("updated", absolute(site.updated_at.as_ref(), "-")),
                ])
            })?;
        }
        SitesCommand::List(args) => {
            let admin = Admin::connect(&args.client.connect)?;
            let tenant = args.tenant.clone();
            let sites = every_page(&admin, |admin, page_token| {
                let request =
                    admin.request(ListSitesRequest { tenant_id: tenant.clone(), page_size: 1000, page_token });
                let mut client = admin.client.clone();
                async move {
                    client
                        .list_sites(request)
                        .await
                        .map(|page| page.into_inner())
                        .map(|page| (page.sites, page.next_page_token))
                }
            })
            .await?;
            let response = ListSitesResponse { sites, next_page_token: String::new() };
            show(args.client.output, &response, "keygate.v1.ListSitesResponse", || {
                let rows = response
                    .sites
                    .iter()
                    .map(|site| {
                        vec![site.site_id.clone(), site.display_name.clone(), relative(site.created_at.as_ref(), "-")]
                    })
                    .collect();
                table(&["SITE", "NAME", "CREATED"], rows)
            })?;
        }
        SitesCommand::Delete(args) => {
            let mut admin = Admin::connect(&args.client.connect)?;
            let request =
                admin.request(DeleteSiteRequest { tenant_id: args.tenant.clone(), site_id: args.site.clone() });
            let response = admin.client.delete_site(request).await.map_err(|status| admin.failed(status))?;
            show(args.client.output, &response.into_inner(), "keygate.v1.DeleteSiteResponse", || {
                format!("deleted site {} of {}\n", args.site, args.tenant)
            })?;
        }
    }
    Ok(Exit::Ok)
}

/// Runs `keygate keys ...`.
pub async fn keys(command: KeysCommand) -> Result<Exit, Failure> {
    match command {
        KeysCommand::Create(args) => create_key(*args).await,
        KeysCommand::Get(args) => {
            let mut admin = Admin::connect(&args.client.connect)?;
            let request = admin.request(GetKeyRequest { tenant_id: args.tenant.clone(), key_id: args.key_id.clone() });
            let response = admin.client.get_key(request).await.map_err(|status| admin.failed(status))?;
            let response = response.into_inner();
            show(args.client.output, &response, "keygate.v1.GetKeyResponse", || key_fields(response.key.as_ref()))?;
            Ok(Exit::Ok)
        }
        KeysCommand::List(args) => list_keys(args).await,
        KeysCommand::Update(args) => update_key(*args).await,
        KeysCommand::Revoke(args) => {
            let mut admin = Admin::connect(&args.client.connect)?;
            let request =
                admin.request(RevokeKeyRequest { tenant_id: args.tenant.clone(), key_id: args.key_id.clone() });
            let response = admin.client.revoke_key(request).await.map_err(|status| admin.failed(status))?;
            let response = response.into_inner();
            show(args.client.output, &response, "keygate.v1.RevokeKeyResponse", || key_fields(response.key.as_ref()))?;
            Ok(Exit::Ok)
        }
        KeysCommand::Rotate(args) => rotate_key(args).await,
        KeysCommand::Import(args) => super::import::run(*args).await,
    }
}

fn environment(environment: Option<Environment>) -> KeyEnvironment {
    match environment {
        None => KeyEnvironment::Unspecified,
        Some(Environment::Live) => KeyEnvironment::Live,
        Some(Environment::Test) => KeyEnvironment::Test,
    }
}

async fn create_key(args: KeyCreateArgs) -> Result<Exit, Failure> {
    refuse_a_closed_stdout()?;
    let mut admin = Admin::connect(&args.client.connect)?;
    let expiry = match (args.expires_in, args.expires_at) {
        (Some(duration), _) => Some(create_key_request::Expiry::ExpiresIn(proto_duration(duration))),
        (None, Some(time)) => Some(create_key_request::Expiry::ExpiresAt(timestamp(time))),
        (None, None) => None,
    };
    let request = admin.request(CreateKeyRequest {
        tenant_id: args.tenant.clone(),
        name: args.name.clone(),
        scopes: args.scopes.clone(),
        site_ids: args.sites.clone(),
        expiry,
        environment: environment(args.environment).into(),
        metadata: metadata_map(&args.metadata)?,
        rate_limit_per_minute: args.rate_limit_per_minute.unwrap_or(0),
    });
    let response = admin.client.create_key(request).await.map_err(|status| admin.failed(status))?;
    let response = response.into_inner();
    let shown = match args.client.output {
        Output::Json => render::json(&response, "keygate.v1.CreateKeyResponse")
            .and_then(|json| render::print_secret(&render::json_text(&json)?)),
        Output::Table => show_secret(key_fields(response.key.as_ref()), &response.secret),
    };
    shown.map_err(|failure| secret_lost(failure, &args.tenant, response.key.as_ref()))?;
    Ok(Exit::Ok)
}

/// Refuses to mint a secret nobody would see: standard output closed (`>&-`, which Rust's
/// runtime reopens as /dev/null at start) or sent to /dev/null.
fn refuse_a_closed_stdout() -> Result<(), Failure> {
    let proc_fds = std::path::Path::new("/proc/self/fd");
    let target = std::fs::read_link(proc_fds.join("1"));
    if proc_fds.is_dir() && target.is_err() || target.is_ok_and(|target| target == std::path::Path::new("/dev/null")) {
        return Err(Failure::usage("standard output is closed or /dev/null: the new secret would be lost"));
    }
    Ok(())
}

/// A failure to print a new key's secret: the key exists but nobody has its secret, so say
/// which key to revoke.
fn secret_lost(failure: Failure, tenant: &str, key: Option<&ApiKey>) -> Failure {
    let key_id = key.map(|key| key.key_id.as_str()).unwrap_or("the new key");
    let rotated = key.is_some_and(|key| !key.rotated_from_key_id.is_empty());
    let remedy = match rotated {
        // The old key may be revoked already: the way out is another rotation, of the new key.
        true => format!("rotate it in turn with `keygate keys rotate --tenant {tenant} {key_id}`"),
        false => format!("revoke it with `keygate keys revoke --tenant {tenant} {key_id}`"),
    };
    Failure::usage(format!("{}: key {key_id} was created but its secret was not shown; {remedy}", failure.message))
}

/// A new key's details and its secret. For a person (a terminal): both, with a note that the
/// secret will not be shown again. For a script (`$(...)`, a pipe): the secret alone on
/// standard output, the details and the note on standard error.
fn show_secret(details: String, secret: &str) -> Result<(), Failure> {
    let note = "This secret is shown once: keygate keeps only its hash. Store it now.";
    if render::stdout_is_terminal() {
        render::print_secret(&format!("{details}\nsecret   {secret}\n\n{note}\n"))
    } else {
        render::print_secret(&format!("{secret}\n"))?;
        eprint!("{details}\n{note}\n");
        Ok(())
    }
}

async fn list_keys(args: KeyListArgs) -> Result<Exit, Failure> {
    let admin = Admin::connect(&args.client.connect)?;
    let (tenant, site) = (args.tenant.clone(), args.site.clone().unwrap_or_default());
    let keys = every_page(&admin, |admin, page_token| {
        let request = admin.request(ListKeysRequest {
            tenant_id: tenant.clone(),
            page_size: 1000,
            page_token,
            include_revoked: args.include_revoked,
            site_id: site.clone(),
        });
        let mut client = admin.client.clone();
        async move {
            client.list_keys(request).await.map(|page| page.into_inner()).map(|page| (page.keys, page.next_page_token))
        }
    })
    .await?;
    let response = ListKeysResponse { keys, next_page_token: String::new() };
    show(args.client.output, &response, "keygate.v1.ListKeysResponse", || {
        let rows = response
            .keys
            .iter()
            .map(|key| {
                vec![
                    key.key_id.clone(),
                    key.name.clone(),
                    format!("{}…", key.display_prefix),
                    enum_word(key.state().as_str_name(), "KEY_STATE_"),
                    list(&key.scopes, "-"),
                    list(&key.site_ids, "all"),
                    relative(key.created_at.as_ref(), "-"),
                    relative(key.expires_at.as_ref(), "never"),
                    relative(key.last_used_at.as_ref(), "never"),
                ]
            })
            .collect();
        table(&["KEY ID", "NAME", "PREFIX", "STATE", "SCOPES", "SITES", "CREATED", "EXPIRES", "LAST USED"], rows)
    })?;
    Ok(Exit::Ok)
}

async fn update_key(args: KeyUpdateArgs) -> Result<Exit, Failure> {
    let mut paths = Vec::new();
    let mut request =
        UpdateKeyRequest { tenant_id: args.tenant.clone(), key_id: args.key_id.clone(), ..Default::default() };
    if let Some(name) = &args.name {
        request.name = name.clone();
        paths.push("name");
    }
    if !args.scopes.is_empty() {
        request.scopes = args.scopes.clone();
        paths.push("scopes");
    }
    if !args.sites.is_empty() || args.all_sites {
        request.site_ids = args.sites.clone();
        paths.push("site_ids");
    }
    let expiry = match (args.expires_in, args.expires_at) {
        (Some(duration), _) => {
            // UpdateKey takes a time: this machine's clock makes it of the duration.
            let at =
                chrono::Duration::from_std(duration).ok().and_then(|duration| Utc::now().checked_add_signed(duration));
            let at = at.filter(|at| at.year() <= 9999);
            Some(Some(timestamp(at.ok_or_else(|| Failure::usage("--expires-in is too far in the future"))?)))
        }
        (None, Some(time)) => Some(Some(timestamp(time))),
        (None, None) if args.no_expiry => Some(None),
        (None, None) => None,
    };
    if let Some(expires_at) = expiry {
        request.expires_at = expires_at;
        paths.push("expires_at");
    }
    if !args.metadata.is_empty() || args.no_metadata {
        request.metadata = metadata_map(&args.metadata)?;
        paths.push("metadata");
    }
    if let Some(limit) = args.rate_limit_per_minute {
        request.rate_limit_per_minute = limit;
        paths.push("rate_limit_per_minute");
    }
    if paths.is_empty() {
        return Err(Failure::usage(
            "nothing to change: give --name, --scope, --site/--all-sites, --expires-in/--expires-at/--no-expiry, \
             --metadata/--no-metadata or --rate-limit-per-minute",
        ));
    }
    request.update_mask = Some(FieldMask { paths: paths.into_iter().map(str::to_owned).collect() });
    let mut admin = Admin::connect(&args.client.connect)?;
    let request = admin.request(request);
    let response = admin.client.update_key(request).await.map_err(|status| admin.failed(status))?;
    let response = response.into_inner();
    show(args.client.output, &response, "keygate.v1.UpdateKeyResponse", || key_fields(response.key.as_ref()))?;
    Ok(Exit::Ok)
}

async fn rotate_key(args: KeyRotateArgs) -> Result<Exit, Failure> {
    refuse_a_closed_stdout()?;
    let mut admin = Admin::connect(&args.client.connect)?;
    let request = admin.request(RotateKeyRequest {
        tenant_id: args.tenant.clone(),
        key_id: args.key_id.clone(),
        grace_period: Some(proto_duration(args.grace_period)),
    });
    let response = admin.client.rotate_key(request).await.map_err(|status| admin.failed(status))?;
    let response = response.into_inner();
    let shown = match args.client.output {
        Output::Json => render::json(&response, "keygate.v1.RotateKeyResponse")
            .and_then(|json| render::print_secret(&render::json_text(&json)?)),
        Output::Table => {
            let previous = response.previous_key.clone().unwrap_or_default();
            let fate = match previous.state() {
                KeyState::Revoked => format!("{} is revoked", previous.key_id),
                _ => format!("{} works until {}", previous.key_id, absolute(previous.expires_at.as_ref(), "-")),
            };
            let mut rows = response.key.as_ref().map(key_rows).unwrap_or_default();
            rows.push(("previous key", fate));
            show_secret(fields(rows), &response.secret)
        }
    };
    shown.map_err(|failure| secret_lost(failure, &args.tenant, response.key.as_ref()))?;
    Ok(Exit::Ok)
}

/// A map as sorted `name=value` items, a value quoted when it holds a separator (`, ` or `=`)
/// or spaces at its ends, so that `note=x, team=admin` cannot pass for two entries.
pub(super) fn pairs<V: std::fmt::Display>(map: &HashMap<String, V>) -> Vec<String> {
    let mut items: Vec<String> = map
        .iter()
        .map(|(name, value)| {
            let value = value.to_string();
            match value.contains([',', '=', '"']) || value.trim() != value || value.is_empty() {
                true => format!("{name}={value:?}"),
                false => format!("{name}={value}"),
            }
        })
        .collect();
    items.sort();
    items
}

fn key_fields(key: Option<&ApiKey>) -> String {
    fields(key.map(key_rows).unwrap_or_default())
}

fn key_rows(key: &ApiKey) -> Vec<(&'static str, String)> {
    let metadata = pairs(&key.metadata);
    let mut rows = vec![
        ("key id", key.key_id.clone()),
        ("tenant", key.tenant_id.clone()),
        ("name", key.name.clone()),
        ("prefix", format!("{}…", key.display_prefix)),
        ("state", enum_word(key.state().as_str_name(), "KEY_STATE_")),
        ("environment", enum_word(key.environment().as_str_name(), "KEY_ENVIRONMENT_")),
        ("scopes", list(&key.scopes, "-")),
        ("sites", list(&key.site_ids, "all the tenant's sites")),
        ("metadata", list(&metadata, "-")),
        ("rate limit", limit(key.rate_limit_per_minute, "per minute", "the tenant's")),
        ("created", absolute(key.created_at.as_ref(), "-")),
        ("expires", absolute(key.expires_at.as_ref(), "never")),
        ("last used", absolute(key.last_used_at.as_ref(), "never")),
    ];
    if key.revoked_at.is_some() {
        rows.push(("revoked", absolute(key.revoked_at.as_ref(), "-")));
    }
    if !key.rotated_from_key_id.is_empty() {
        rows.push(("rotated from", key.rotated_from_key_id.clone()));
    }
    rows
}

/// Runs `keygate usage`.
pub async fn usage(args: UsageArgs) -> Result<Exit, Failure> {
    let to = args.to.unwrap_or_else(|| Utc::now().date_naive());
    let from = args.from.unwrap_or_else(|| to - chrono::Days::new(29));
    if from > to {
        return Err(Failure::usage("--from must not be after --to"));
    }
    let mut admin = Admin::connect(&args.client.connect)?;
    let request = admin.request(GetKeyUsageRequest {
        tenant_id: args.tenant.clone(),
        key_id: args.key_id.clone(),
        start_date: from.to_string(),
        end_date: to.to_string(),
    });
    let response = admin.client.get_key_usage(request).await.map_err(|status| admin.failed(status))?;
    let response = response.into_inner();
    show(args.client.output, &response, "keygate.v1.GetKeyUsageResponse", || {
        let rows = response
            .days
            .iter()
            .map(|day| {
                let mut reasons: Vec<String> = day
                    .denied_by_reason
                    .iter()
                    .map(|(reason, count)| format!("{} {count}", enum_word(reason, "DENY_REASON_")))
                    .collect();
                reasons.sort();
                vec![day.date.clone(), day.allowed.to_string(), day.denied.to_string(), list(&reasons, "")]
            })
            .collect();
        table(&["DATE", "ALLOWED", "DENIED", "DENIED BY REASON"], rows)
    })?;
    Ok(Exit::Ok)
}

/// Runs `keygate audit`.
pub async fn audit(args: AuditArgs) -> Result<Exit, Failure> {
    if let (Some(since), Some(until)) = (args.since, args.until)
        && since >= until
    {
        return Err(Failure::usage("--since must be before --until"));
    }
    let admin = Admin::connect(&args.client.connect)?;
    let template = ListAuditEventsRequest {
        tenant_id: args.tenant.clone(),
        key_id: args.key.clone().unwrap_or_default(),
        event_types: args.types.iter().map(|kind| i32::from(*kind)).collect(),
        start_time: args.since.map(timestamp),
        end_time: args.until.map(timestamp),
        page_size: 1000,
        page_token: String::new(),
    };
    let events = every_page(&admin, |admin, page_token| {
        let request = admin.request(ListAuditEventsRequest { page_token, ..template.clone() });
        let mut client = admin.client.clone();
        async move {
            client
                .list_audit_events(request)
                .await
                .map(|page| page.into_inner())
                .map(|page| (page.events, page.next_page_token))
        }
    })
    .await?;
    let response = ListAuditEventsResponse { events, next_page_token: String::new() };
    show(args.client.output, &response, "keygate.v1.ListAuditEventsResponse", || {
        let rows = response
            .events
            .iter()
            .map(|event| {
                let details = pairs(&event.details);
                vec![
                    relative(event.occurred_at.as_ref(), "-"),
                    enum_word(event.event_type().as_str_name(), "AUDIT_EVENT_TYPE_"),
                    if event.key_id.is_empty() { "-".to_owned() } else { event.key_id.clone() },
                    if event.actor.is_empty() { "-".to_owned() } else { event.actor.clone() },
                    event.count.to_string(),
                    list(&details, ""),
                ]
            })
            .collect();
        table(&["WHEN", "EVENT", "KEY", "ACTOR", "COUNT", "DETAILS"], rows)
    })?;
    Ok(Exit::Ok)
}
