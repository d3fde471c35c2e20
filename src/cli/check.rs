//! `keygate check KEY --scope S [--site X]`: asks Authorize.Check what it decides for a key,
//! and why, for debugging. Exit code 0 when allowed, [`Exit::Denied`] when denied.

use std::io::Read;
use std::time::Duration;

use clap::Args;

use super::admin::ClientArgs;
use super::render::{self, Output, absolute, enum_word, fields, list};
use super::{Exit, Failure};
use crate::config::SecretText;
use crate::proto::CheckRequest;
use crate::proto::authorize_client::AuthorizeClient;

/// The longest key Check takes, in bytes.
const MAX_KEY_BYTES: usize = 512;

/// Flags of `keygate check`.
#[derive(Clone, Debug, Args)]
#[command(
    after_help = "Examples:\n  printf %s \"$KEY\" | keygate check - --scope analytics:read --site shop.example\n  \
    printf %s \"$KEY\" | keygate check - --scope analytics:read --output json\n\n\
    Exit code 0: allowed; 5: denied (the output says why). `-` keeps the key out of `ps`.",
    mut_arg("admin_token", |argument| argument.hide(true))
)]
pub struct CheckArgs {
    /// The key as the end user presents it; `-` reads it from standard input (keeps it out of
    /// shell history and `ps`).
    pub key: SecretText,
    /// The scope the endpoint needs, as `resource:action`.
    #[arg(long)]
    pub scope: String,
    /// The site the request touches; unset for an endpoint that touches no single site.
    #[arg(long, default_value = "")]
    pub site: String,
    /// The tenant the endpoint belongs to, when its URL names one.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// A caller token for Check, when the server sets KEYGATE_AUTHORIZE_TOKENS.
    #[arg(long, env = "KEYGATE_AUTHORIZE_TOKEN", hide_env_values = true)]
    pub authorize_token: Option<SecretText>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `keygate check`.
pub async fn run(args: CheckArgs) -> Result<Exit, Failure> {
    let key = match args.key.expose() {
        "-" => {
            // A key is at most 512 bytes: read a little more than that, never all of a stream.
            let mut text = String::new();
            std::io::stdin()
                .take(MAX_KEY_BYTES as u64 + 3)
                .read_to_string(&mut text)
                .map_err(|error| Failure::usage(format!("cannot read the key from standard input: {error}")))?;
            let key = text.trim_end_matches(['\r', '\n']);
            if key.len() > MAX_KEY_BYTES {
                return Err(Failure::usage(format!(
                    "standard input holds more than a key ({MAX_KEY_BYTES} bytes at most)"
                )));
            }
            key.to_owned()
        }
        key => key.to_owned(),
    };
    let connect = &args.client.connect;
    let mut client = AuthorizeClient::new(connect.channel()?);
    let mut request = tonic::Request::new(CheckRequest {
        key,
        scope: args.scope.clone(),
        site_id: args.site.clone(),
        tenant_id: args.tenant.clone(),
    });
    request.set_timeout(Duration::from_secs(30));
    if let Some(token) = args.authorize_token.as_ref().map(SecretText::expose).filter(|token| !token.is_empty()) {
        request.metadata_mut().insert("authorization", super::bearer(token, "KEYGATE_AUTHORIZE_TOKEN")?);
    }
    let response = client.check(request).await.map_err(|status| Failure::from_call(&status, &connect.address()))?;
    let decision = response.into_inner();
    match args.client.output {
        Output::Json => render::print_json(&render::json(&decision, "keygate.v1.CheckResponse")?)?,
        Output::Table => {
            let verdict = match decision.allowed {
                true => "allowed".to_owned(),
                false => format!("denied: {}", decision.reason().as_str_name()),
            };
            let mut rows = vec![("decision", verdict)];
            if !decision.message.is_empty() {
                rows.push(("message", decision.message.clone()));
            }
            rows.push(("http status", decision.http_status.to_string()));
            if !decision.key_id.is_empty() {
                rows.extend([
                    ("tenant", decision.tenant_id.clone()),
                    ("key id", decision.key_id.clone()),
                    ("key name", decision.key_name.clone()),
                    ("environment", enum_word(decision.environment().as_str_name(), "KEY_ENVIRONMENT_")),
                    ("scopes", list(&decision.scopes, "-")),
                    ("sites", list(&decision.site_ids, "all the tenant's sites")),
                    ("metadata", list(&super::admin::pairs(&decision.metadata), "-")),
                    ("expires", absolute(decision.expires_at.as_ref(), "never")),
                ]);
            }
            if let Some(limit) = &decision.rate_limit {
                let window = enum_word(limit.window().as_str_name(), "RATE_LIMIT_WINDOW_");
                let subject = enum_word(limit.subject().as_str_name(), "RATE_LIMIT_SUBJECT_");
                rows.push((
                    "rate limit",
                    format!(
                        "{} of {} per {window} left ({subject}), resets {}",
                        limit.remaining,
                        limit.limit,
                        render::relative(limit.reset_at.as_ref(), "-")
                    ),
                ));
            }
            render::print_out(&fields(rows))?;
        }
    }
    Ok(if decision.allowed { Exit::Ok } else { Exit::Denied })
}
