//! The configuration file (`--config FILE`, `KEYGATE_CONFIG`): TOML holding any setting of
//! `keygate serve` under its flag's name with underscores (`database_url`, `key_format`,
//! `max_concurrent_streams`), and the `[answers]` tables (see [`crate::answers`]).
//!
//! Precedence: a flag over its `KEYGATE_*` variable over the file over the default. The file's
//! values become the defaults of the command line, so clap applies that order itself. A list
//! setting may be a TOML array (`imported_key_formats = ["tga_{hex:64}", "^legacy_…$"]`);
//! unknown names and mistyped values are errors that name the line's setting.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::answers::AnswersFile;
use crate::config::{Cli, Command};

/// Settings whose TOML arrays are joined with spaces rather than commas.
const SPACE_SEPARATED: [&str; 1] = ["imported_key_formats"];

/// Settings that hold secrets: `keygate config check` prints them redacted.
pub const SECRET_SETTINGS: [&str; 3] = ["admin_tokens", "authorize_tokens", "database_url"];

/// Why the command line or the file could not be read.
#[derive(Debug)]
pub enum CliError {
    /// clap's own error (also `--help` and `--version`, which are not failures).
    Clap(clap::Error),
    /// The configuration file: cannot be read, is not TOML, or holds a mistake.
    File(String),
}

/// A read configuration file.
#[derive(Clone, Debug, Default)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// Flat settings as command-line default values, by argument id.
    pub values: Vec<(String, String)>,
    pub answers: AnswersFile,
}

/// The subcommands that read the configuration file (none is `serve`).
const READ_BY: [&str; 2] = ["serve", "migrate"];

/// The path of `--config FILE` / `--config=FILE` in `argv`, else `KEYGATE_CONFIG`; `None` for
/// a subcommand that does not read it (`gen-token`, `import`, `config check`, which reads the
/// file it is given).
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let subcommand =
        argv.iter().skip(1).map(|argument| argument.to_string_lossy()).find(|argument| !argument.starts_with('-'));
    let known: Vec<String> = Cli::command().get_subcommands().map(|command| command.get_name().to_owned()).collect();
    if let Some(subcommand) = subcommand
        && known.iter().any(|name| name == subcommand.as_ref())
        && !READ_BY.contains(&subcommand.as_ref())
    {
        return None;
    }
    let mut arguments = argv.iter().skip(1);
    while let Some(argument) = arguments.next() {
        let text = argument.to_string_lossy();
        if text == "--" {
            break;
        }
        if text == "--config" {
            return arguments.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("KEYGATE_CONFIG").filter(|path| !path.is_empty()).map(PathBuf::from)
}

/// The ids of `keygate serve`'s settings, in the order `--help` shows them.
pub fn setting_ids() -> Vec<String> {
    let command = Cli::command();
    let serve = command.find_subcommand("serve").cloned().unwrap_or(command);
    serve
        .get_arguments()
        .filter(|argument| !argument.is_positional() && argument.get_long().is_some())
        .map(|argument| argument.get_id().as_str().to_owned())
        .filter(|id| id != "config")
        .collect()
}

impl ConfigFile {
    /// Reads and checks `path`. Errors start with the file's name.
    pub fn read(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read the configuration file {shown}: {error}"))?;
        let mut table: toml::Table = text.parse().map_err(|error: toml::de::Error| {
            // The message and the place only: the rendered error quotes the line, which can
            // hold a token or a database password.
            let place = error.span().map_or_else(String::new, |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |start| start.chars().count()) + 1;
                format!(" (line {line}, column {column})")
            });
            format!("{shown}: not valid TOML{place}: {}", error.message())
        })?;
        let answers = match table.remove("answers") {
            None => AnswersFile::default(),
            Some(value) => value.try_into().map_err(|error: toml::de::Error| format!("{shown}: [answers]: {error}"))?,
        };
        let known = setting_ids();
        let mut values = Vec::new();
        for (name, value) in table {
            if !known.contains(&name) {
                let hint = known
                    .iter()
                    .find(|id| id.contains(name.as_str()) || name.contains(id.as_str()))
                    .map(|id| format!(" (did you mean {id}?)"))
                    .unwrap_or_default();
                return Err(format!(
                    "{shown}: {name:?} is no setting{hint}; settings are the flags of `keygate serve --help` with \
                     underscores, plus [answers]"
                ));
            }
            let separator = if SPACE_SEPARATED.contains(&name.as_str()) { " " } else { "," };
            let text = match value {
                toml::Value::String(text) => text,
                toml::Value::Integer(number) => number.to_string(),
                toml::Value::Boolean(flag) => flag.to_string(),
                toml::Value::Array(items) => items
                    .into_iter()
                    .map(|item| match item {
                        toml::Value::String(text) => Ok(text),
                        other => Err(format!("{shown}: {name}: a list of strings, not {}", other.type_str())),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(separator),
                other => return Err(format!("{shown}: {name}: a {} is no value of this setting", other.type_str())),
            };
            values.push((name, text));
        }
        Ok(Self { path: path.to_owned(), values, answers })
    }

    fn has(&self, id: &str) -> bool {
        self.values.iter().any(|(name, _)| name == id)
    }
}

/// Parses the command line with the configuration file's settings as defaults; the `[answers]`
/// tables land in [`ServeArgs::answers`](crate::config::ServeArgs::answers). Also returns the file and the matches, for
/// `keygate config check`.
pub fn parse(argv: impl IntoIterator<Item = impl Into<OsString>>) -> Result<(Cli, Option<ConfigFile>), CliError> {
    let (cli, file, _) = parse_with_matches(argv)?;
    Ok((cli, file))
}

fn parse_with_matches(
    argv: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<(Cli, Option<ConfigFile>, ArgMatches), CliError> {
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let file = config_path(&argv).map(|path| ConfigFile::read(&path)).transpose().map_err(CliError::File)?;
    let mut command = Cli::command();
    if let Some(file) = &file {
        for (id, value) in &file.values {
            // Leaked once per setting at start: clap keeps default values for the process's life.
            let value: &'static str = value.clone().leak();
            // `--help` shows a file's value as the default, except a secret's.
            let secret = SECRET_SETTINGS.contains(&id.as_str());
            let set = |argument: clap::Arg| argument.default_value(value).hide_default_value(secret);
            command = command.mut_arg(id.as_str(), set);
            for name in READ_BY {
                let has = command.find_subcommand(name).is_some_and(|subcommand| {
                    subcommand.get_arguments().any(|argument| argument.get_id() == id.as_str())
                });
                if has {
                    command = command.mut_subcommand(name, |subcommand| subcommand.mut_arg(id.as_str(), set));
                }
            }
        }
    }
    let matches = command.try_get_matches_from(argv).map_err(CliError::Clap)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(CliError::Clap)?;
    if let Some(file) = &file {
        cli.serve.answers = Some(file.answers.clone());
        if let Some(Command::Serve(serve)) = &mut cli.command {
            serve.answers = Some(file.answers.clone());
        }
    }
    Ok((cli, file, matches))
}

/// Where a setting's value came from.
fn source(matches: &ArgMatches, file: Option<&ConfigFile>, id: &str) -> &'static str {
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => "flag",
        Some(ValueSource::EnvVariable) => "environment",
        Some(ValueSource::DefaultValue) if file.is_some_and(|file| file.has(id)) => "file",
        _ => "default",
    }
}

/// `keygate config check FILE`: reads `file` the way `keygate serve --config FILE` would (the
/// `KEYGATE_*` variables still apply over it), validates everything, and returns the effective
/// configuration as TOML with each value's source; secrets print as `[redacted]`.
pub fn check(file: &Path) -> Result<String, String> {
    let argv = [OsString::from("keygate"), OsString::from("--config"), file.as_os_str().to_owned()];
    let (cli, read, matches) = parse_with_matches(argv).map_err(|error| match error {
        CliError::Clap(error) => crate::config::explain_cli_error(&error),
        CliError::File(error) => error,
    })?;
    let config = crate::config::Config::from_args(&cli.serve)?;
    // The URL's scheme and form, as `serve` would take them (nothing is connected).
    crate::store::Store::connect_lazy(&config.database).map_err(|error| format!("KEYGATE_DATABASE_URL: {error}"))?;
    let mut out = format!("# the effective configuration of {} (valid)\n", file.display());
    for id in setting_ids() {
        let value = matches
            .get_raw(&id)
            .map(|values| values.map(|value| value.to_string_lossy().into_owned()).collect::<Vec<_>>().join(","));
        let Some(value) = value else { continue };
        let shown =
            if SECRET_SETTINGS.contains(&id.as_str()) && !value.is_empty() { "[redacted]".to_owned() } else { value };
        // A JSON string is a valid TOML basic string.
        let shown = serde_json::Value::from(shown).to_string();
        out.push_str(&format!("{id} = {shown}  # {}\n", source(&matches, read.as_ref(), &id)));
    }
    out.push_str(&config.answers.describe());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let (_dir, path) = write(
            "key_format = \"tga_{hex:64}\"\ncache_ttl_seconds = 7\nimported_key_formats = [\"bj_{env}_{hex:64}\", \"^legacy_[a-z]{24}$\"]\nenvoy_strip_credentials = false\n",
        );
        let path = path.to_str().unwrap();
        let (cli, _) = parse(["keygate", "--config", path, "--cache-ttl-seconds", "9"]).unwrap();
        assert_eq!(cli.serve.key_format.as_deref(), Some("tga_{hex:64}"));
        assert_eq!(cli.serve.cache_ttl_seconds, 9, "the flag wins");
        assert_eq!(cli.serve.imported_key_formats, "bj_{env}_{hex:64} ^legacy_[a-z]{24}$");
        assert!(!cli.serve.envoy_strip_credentials);
        assert_eq!(cli.serve.negative_cache_ttl_seconds, 5, "not in the file: the default");
        let (cli, _) = parse(["keygate", "serve", &format!("--config={path}")]).unwrap();
        let Some(Command::Serve(serve)) = cli.command else { panic!("serve") };
        assert_eq!(serve.cache_ttl_seconds, 7);
    }

    #[test]
    fn no_secret_of_the_file_is_shown_by_help_or_a_syntax_error() {
        let secret = "hunter2hunter2hunter2";
        let (_dir, path) = write(&format!(
            "database_url = \"postgres://keygate:{secret}@db/keygate\"\nadmin_tokens = \"ops={secret}\"\ncache_ttl_seconds = 7\n"
        ));
        let path = path.to_str().unwrap();
        for argv in [vec!["keygate", "--config", path, "--help"], vec!["keygate", "serve", "--config", path, "--help"]]
        {
            let Err(CliError::Clap(help)) = parse(argv.clone()) else { panic!("{argv:?}: help") };
            let shown = help.render().to_string();
            assert!(!shown.contains(secret), "{argv:?}: {shown}");
            assert!(shown.contains("[default: 7]"), "the file's other values are shown: {shown}");
        }
        let (_dir, broken) = write(&format!("admin_tokens = \"ops={secret}\ncache_ttl_seconds = 7\n"));
        let Err(CliError::File(error)) = parse(["keygate", "--config", broken.to_str().unwrap()]) else {
            panic!("a broken file")
        };
        assert!(!error.contains(secret) && error.contains("line 1"), "{error}");
    }

    #[test]
    fn migrate_reads_the_file_and_other_commands_ignore_it() {
        let (_dir, path) = write("database_url = \"sqlite:///tmp/from-the-file.db\"\ndb_max_connections = 3\n");
        let path = path.to_str().unwrap();
        let (cli, _) = parse(["keygate", "migrate", "--config", path]).unwrap();
        let Some(Command::Migrate(args)) = cli.command else { panic!("migrate") };
        assert_eq!(args.database.database_url.0, "sqlite:///tmp/from-the-file.db");
        assert_eq!(args.database.db_max_connections, 3);
        let argv: Vec<OsString> = ["keygate", "gen-token"].iter().map(OsString::from).collect();
        assert_eq!(config_path(&argv), None);
        let argv: Vec<OsString> = ["keygate", "--config", path].iter().map(OsString::from).collect();
        assert!(config_path(&argv).is_some(), "serve reads it");
    }

    #[test]
    fn mistakes_in_the_file_name_the_setting() {
        for (text, expected) in [
            ("cache_ttl = 5", "\"cache_ttl\" is no setting (did you mean cache_ttl_seconds?)"),
            ("cache_ttl_seconds = \"soon\"", "soon"),
            ("cache_ttl_seconds = [1]", "a list of strings"),
            ("listen = { a = 1 }", "no value of this setting"),
            ("key_format = ", "keygate.toml"),
            ("[answers.deny.NOPE]\nstatus = 400", "no deny reason"),
            ("[answers]\ncolour = 1", "[answers]"),
        ] {
            let (_dir, path) = write(text);
            let error =
                match parse(["keygate", "--admin-tokens", "t=0123456789abcdef", "--config", path.to_str().unwrap()]) {
                    Err(CliError::File(error)) => error,
                    Err(CliError::Clap(error)) => crate::config::explain_cli_error(&error),
                    Ok((cli, _)) => match crate::config::Config::from_args(&cli.serve) {
                        Err(error) => error,
                        Ok(_) => panic!("{text}: accepted"),
                    },
                };
            assert!(error.contains(expected), "{text}: {error}");
        }
        for (text, expected) in [
            (
                "admin_tokens = \"x-api-key-token-0123456789\"\n[answers.headers]\ntenant_id = \"X_API_KEY\"",
                "keys are read from",
            ),
            ("cache_ttl_seconds = 99999999999999", "at most 31536000"),
        ] {
            let (_dir, path) = write(text);
            let (cli, _) =
                parse(["keygate", "--admin-tokens", "t=0123456789abcdef", "--config", path.to_str().unwrap()]).unwrap();
            let error = crate::config::Config::from_args(&cli.serve).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let missing = parse(["keygate", "--config", "/no/such/keygate.toml"]).unwrap_err();
        assert!(matches!(missing, CliError::File(error) if error.contains("/no/such/keygate.toml")));
    }
}
